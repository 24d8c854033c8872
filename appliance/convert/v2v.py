"""The virt-v2v-in-place backend: the one Windows guests need, optional for Linux.

virt-v2v opens its own libguestfs handles, so TCG is forced through the environment
(LIBGUESTFS_BACKEND_SETTINGS=force_tcg), never through a handle setting. Windows needs the
operator's virtio-win (VIRTIO_WIN) and, for first-boot scripts, rhsrvany.exe and pnp_wait.exe
(VIRT_TOOLS_DATA_DIR); the preflight refuses before we get here when they are missing.

Known cost on Linux guests: virt-v2v installs a first-boot script that tries to install
qemu-guest-agent from the network, which delays the first boot of an air-gapped guest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.convert.errors import ConversionFailed
from appliance.errors import Cancelled

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 1800.0  # seconds; a Linux guest takes ~2.5 min under TCG
POLL = 0.5  # seconds


@dataclass
class V2VRun:
    seconds: float
    log_path: str
    command: list[str]


def environment(virtio_win: Path | None, virt_tools_dir: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("LIBGUESTFS_BACKEND", "direct")
    env.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    env["LANG"] = "C.UTF-8"
    if virtio_win is not None:
        env["VIRTIO_WIN"] = str(virtio_win)
    if virt_tools_dir is not None:
        env["VIRT_TOOLS_DATA_DIR"] = str(virt_tools_dir)
    return env


def run_virt_v2v_in_place(
    overlay: Path,
    *,
    log_path: Path,
    fmt: str = "qcow2",
    virtio_win: Path | None = None,
    virt_tools_dir: Path | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    cancel: threading.Event | None = None,
) -> V2VRun:
    """Convert ``overlay`` in place. Raises ConversionFailed with the end of the log."""
    cmd = ["virt-v2v-in-place", "-i", "disk", "-if", fmt, str(overlay)]
    log.info("running %s", " ".join(cmd))
    t0 = time.monotonic()
    with log_path.open("wb") as out:
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=environment(virtio_win, virt_tools_dir),
                start_new_session=True,  # so a timeout stops virt-v2v and its qemu together
            )
        except OSError as e:
            raise ConversionFailed(
                f"cannot run virt-v2v-in-place: {e}", hint="install the Debian package virt-v2v"
            ) from e
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > timeout:
                    raise ConversionFailed(
                        f"virt-v2v-in-place on {overlay} did not finish within {timeout:.0f} s",
                        hint=f"read {log_path}",
                    )
                if cancel is not None and cancel.is_set():
                    raise Cancelled(f"conversion of {overlay} cancelled")
                time.sleep(POLL)
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
        raise ConversionFailed(
            f"virt-v2v-in-place failed on {overlay} (status {proc.returncode}): "
            + " | ".join(tail),
            hint=f"read {log_path}",
        )
    return V2VRun(seconds=seconds, log_path=str(log_path), command=cmd)
