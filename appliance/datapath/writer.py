"""Local NBD servers: qemu-nbd as the writer of a new overlay, or a read-only reader.

Cache mode: ``--cache=none`` (O_DIRECT) with ``--aio=native`` is the default. The appliance
writes whole disks once and never reads them back soon, so the page cache would only evict
what the daemon and the guests of test runs need; O_DIRECT also makes a flush cheap (only
qcow2 metadata and the drive's cache remain). Durability never depends on the cache mode:
the copier journals an extent only after an NBD flush that qemu-nbd turns into fdatasync.
Filesystems without O_DIRECT (tmpfs) get ``--cache=writeback`` (flushes still fsync).

A qcow2 written through qemu-nbd is consistent for other readers only after the writer
flushed and exited (design.md, facts): ``stop()`` waits for the exit and checks its status.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType

import nbd

from appliance.datapath.errors import WriterError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 30.0  # qemu-nbd flushes on SIGTERM; a large writeback cache takes a moment


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """qemu-nbd gets SIGTERM (flush, exit) when the thread that started it dies, so a
    killed engine never leaves a writer holding the partial overlay's lock. The signal is
    tied to the starting THREAD: start and stop a QemuNbd in the same thread (the job's)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def supports_odirect(directory: Path) -> bool:
    probe = directory / f".odirect-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o600)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    else:
        os.close(fd)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            probe.unlink()


class QemuNbd:
    """One qemu-nbd process serving one image on a unix socket. Always stopped by ``stop``
    (or the context manager), by PID, never by name."""

    def __init__(
        self,
        image: Path,
        socket_dir: Path,
        *,
        read_only: bool = False,
        fmt: str = "qcow2",
        cache: str | None = None,
        bitmap: str | None = None,
        shared: int = 4,
        export_name: str = "",
    ) -> None:
        self.image = Path(image)
        self.read_only = read_only
        self.fmt = fmt
        self.bitmap = bitmap
        self.shared = shared
        self.export_name = export_name
        socket_dir.mkdir(parents=True, exist_ok=True)
        self.socket = socket_dir / f"qnbd-{uuid.uuid4().hex[:12]}.sock"
        if cache is None:
            cache = "none" if supports_odirect(self.image.parent) else "writeback"
        self.cache = cache
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr_path = socket_dir / (self.socket.name + ".log")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export_name}?socket={self.socket}"

    def argv(self) -> list[str]:
        args = [
            "qemu-nbd",
            f"--format={self.fmt}",
            f"--socket={self.socket}",
            f"--cache={self.cache}",
            f"--shared={self.shared}",
            "--persistent",
        ]
        if self.export_name:
            args.append(f"--export-name={self.export_name}")
        if self.cache == "none":
            args.append("--aio=native")
        if self.read_only:
            args.append("--read-only")
        else:
            args.append("--discard=unmap")
        if self.bitmap:
            args.append(f"--bitmap={self.bitmap}")
        args.append(str(self.image))
        return args

    def start(self) -> QemuNbd:
        with open(self._stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=die_with_parent,
            )
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise WriterError(
                    f"qemu-nbd for {self.image} exited at start ({self.proc.returncode}): "
                    f"{self._stderr()}",
                    hint="the image may be locked by another process or damaged",
                )
            if self.socket.exists():
                try:
                    h = nbd.NBD()
                    h.connect_uri(self.uri)
                    h.shutdown()
                    return self
                except nbd.Error:
                    pass
            time.sleep(0.02)
        self.kill()
        raise WriterError(
            f"qemu-nbd for {self.image} did not start in {START_TIMEOUT_S}s",
            hint="see the daemon log",
        )

    def _stderr(self) -> str:
        try:
            return self._stderr_path.read_text(errors="replace").strip()[-500:]
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int:
        """SIGTERM, wait; qemu-nbd flushes the image and exits 0. Returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.kill()
        rc = self.proc.returncode
        self._cleanup()
        return rc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        for p in (self.socket, self._stderr_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def __enter__(self) -> QemuNbd:
        return self.start() if self.proc is None else self

    def __exit__(
        self,
        t: type[BaseException] | None,
        v: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
