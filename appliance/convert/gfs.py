"""Opening disk images with libguestfs, safely and with a deadline.

Why a module of its own: every libguestfs call in Ferryman goes through here so that
- the appliance runs under TCG where KVM does not work (LIBGUESTFS_BACKEND_SETTINGS, set in the
  environment because handles that virt-v2v opens itself never see a per-handle setting);
- a hostile or damaged disk (reliability row 21) ends in a DamagedDisk error within a deadline:
  a watchdog kills the appliance if launch or inspection hangs, and nothing is ever mounted on
  the host (all parsing happens inside the appliance, see guestfs-security(1));
- the handle never writes to the terminal (events go to logging).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from appliance.convert.errors import DamagedDisk, InspectError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 300.0  # seconds; a TCG launch takes ~20 s, inspection of a guest ~10-40 s


def tcg_environment() -> None:
    """Default libguestfs to the direct backend under TCG unless the operator said otherwise."""
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")


def _import_guestfs() -> Any:
    try:
        import guestfs
    except ImportError as e:  # pragma: no cover - depends on the host
        raise InspectError(
            "the libguestfs Python binding is not importable",
            hint="install python3-guestfs and use a venv built with --system-site-packages",
        ) from e
    return guestfs


def _text(buf: str | bytes) -> str:
    return buf.decode(errors="replace") if isinstance(buf, bytes) else buf


class Watchdog:
    """Kills the libguestfs appliance (qemu) if an operation outlives its deadline."""

    def __init__(self, g: Any, timeout: float, what: str) -> None:
        self.g = g
        self.timeout = timeout
        self.what = what
        self.fired = False
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        log.warning("%s: deadline of %.0f s passed, killing the appliance", self.what, self.timeout)
        try:
            pid = int(self.g.get_pid())
        except Exception:
            return
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()


@contextlib.contextmanager
def open_disks(
    disks: list[Path],
    *,
    readonly: bool,
    fmt: str = "qcow2",
    timeout: float = DEFAULT_TIMEOUT,
    network: bool = False,
) -> Iterator[Any]:
    """A launched libguestfs handle with ``disks`` added (in order: sda, sdb, ...).

    Raises DamagedDisk if the appliance cannot start on these disks within ``timeout``.
    """
    tcg_environment()
    guestfs = _import_guestfs()
    for d in disks:
        if not d.exists():
            raise InspectError(
                f"disk image {d} does not exist", hint="check the restore point path"
            )
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend(os.environ.get("LIBGUESTFS_BACKEND", "direct"))
    g.set_network(network)
    g.set_event_callback(
        lambda ev, eh, buf, arr: log.debug("guestfs: %s", _text(buf).rstrip()),
        guestfs.EVENT_APPLIANCE | guestfs.EVENT_LIBRARY | guestfs.EVENT_WARNING,
    )
    try:
        for d in disks:
            g.add_drive_opts(str(d), format=fmt, readonly=readonly)
        with Watchdog(g, timeout, f"launch on {disks[0]}") as wd:
            try:
                g.launch()
            except RuntimeError as e:
                if wd.fired:
                    raise DamagedDisk(
                        f"the libguestfs appliance did not start on {disks[0]} "
                        f"within {timeout:.0f} s",
                        hint="the disk may be damaged; pick an earlier restore point",
                    ) from e
                raise InspectError(
                    f"libguestfs could not start on {disks[0]}: {e}",
                    hint="run libguestfs-test-tool to check the host set-up",
                ) from e
        yield g
    finally:
        with contextlib.suppress(Exception):
            g.shutdown()
        g.close()


def guarded(g: Any, timeout: float, what: str) -> Watchdog:
    """``with guarded(g, 120, 'inspect x'):`` kills the appliance past the deadline."""
    return Watchdog(g, timeout, what)
