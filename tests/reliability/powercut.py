"""A disk whose power can be cut: an ext4 filesystem on a block device with a volatile write
cache, built from parts this host has (its kernel has no device-mapper and no nbd module, and
there is no nested KVM to run the engine in a guest fast enough).

    nbdkit file disk.img --filter=cache cache=writeback   the "drive": writes sit in its cache
                                                          until a FLUSH writes them to disk.img
    nbdfuse DIR URI                                       exposes the drive as the file DIR/nbd
    losetup /dev/loopN DIR/nbd; mkfs.ext4; mount          a real kernel filesystem on it

fsync() on the filesystem becomes a FLUSH of the loop device, an fsync of the FUSE file, an
NBD flush, and the cache filter's write-back into disk.img. ``cut()`` kills nbdkit with
SIGKILL first (its cache, an unlinked temp file, is gone: every write not flushed is lost),
then every process of the engine; the dead mount is detached. ``power_on()`` serves disk.img
again, replays the ext4 journal (fsck -p) and mounts it: what a machine sees after a reset.

Every process is started here and stopped by its PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path


def _kill(pid: int | None, sig: int = signal.SIGKILL) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pid: int, timeout: float = 10) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and Path(f"/proc/{pid}").exists():
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found, then theirs)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


class PowerCutDisk:
    def __init__(self, base: Path, size: str = "768M") -> None:
        self.base = base
        self.image = base / "disk.img"
        self.sock = base / "drive.sock"
        self.pidfile = base / "drive.pid"
        self.fuse_dir = base / "fuse"
        self.mnt = base / "mnt"
        self.size = size
        self.nbdkit_pid: int | None = None
        self.nbdfuse: subprocess.Popen[bytes] | None = None
        self.loop: str | None = None
        self.fsck_output = ""

    # -- the layers ----------------------------------------------------------------------

    def _drive_on(self) -> None:
        self.sock.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)
        subprocess.run(
            [
                "nbdkit",
                "--unix",
                str(self.sock),
                "--pidfile",
                str(self.pidfile),
                "--filter=cache",
                "file",
                str(self.image),
                "cache=writeback",
            ],
            check=True,
            timeout=30,
        )
        end = time.monotonic() + 10
        while not (self.pidfile.exists() and self.pidfile.read_text().strip()):
            if time.monotonic() > end:
                raise RuntimeError("nbdkit (the power-cut drive) wrote no pid file")
            time.sleep(0.02)
        self.nbdkit_pid = int(self.pidfile.read_text())
        self.fuse_dir.mkdir(exist_ok=True)
        self.nbdfuse = subprocess.Popen(
            ["nbdfuse", str(self.fuse_dir), f"nbd+unix:///?socket={self.sock}"]
        )
        end = time.monotonic() + 10
        while not (self.fuse_dir / "nbd").exists():
            if time.monotonic() > end or self.nbdfuse.poll() is not None:
                raise RuntimeError("nbdfuse did not expose the drive")
            time.sleep(0.05)
        self.loop = subprocess.run(
            ["losetup", "-f", "--show", str(self.fuse_dir / "nbd")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    def create(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        subprocess.run(["truncate", "-s", self.size, str(self.image)], check=True)
        self._drive_on()
        assert self.loop
        subprocess.run(["mkfs.ext4", "-q", "-F", self.loop], check=True, timeout=120)
        self._mount()

    def _mount(self) -> None:
        assert self.loop
        self.mnt.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "ext4", self.loop, str(self.mnt)], check=True)

    def power_on(self) -> None:
        """The machine restarts: the drive holds only what was flushed; ext4 replays its
        journal (fsck -p exits 0 or 1 when it fixed things, never more)."""
        self._drive_on()
        assert self.loop
        r = subprocess.run(["fsck.ext4", "-p", self.loop], capture_output=True, text=True)
        self.fsck_output = r.stdout + r.stderr
        if r.returncode > 1:
            raise AssertionError(f"fsck.ext4 -p exited {r.returncode}: {self.fsck_output}")
        self._mount()

    def cut(self, engine_pids: list[int]) -> None:
        """Power off: the drive loses its cache first, then every engine process stops."""
        _kill(self.nbdkit_pid)
        everyone = [p for e in engine_pids for p in (e, *descendants(e))]
        for p in everyone:
            _kill(p)
        for p in everyone:
            _wait_gone(p)
        self._detach(lazy=True)

    def _detach(self, lazy: bool) -> None:
        subprocess.run(["umount", *(["-l"] if lazy else []), str(self.mnt)], check=False)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], check=False)
            self.loop = None
        subprocess.run(["fusermount", "-u", "-z", str(self.fuse_dir)], check=False)
        if self.nbdfuse is not None:
            if self.nbdfuse.poll() is None:
                self.nbdfuse.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.nbdfuse.wait(10)
            if self.nbdfuse.poll() is None:
                self.nbdfuse.kill()
                self.nbdfuse.wait(10)
            self.nbdfuse = None
        if self.nbdkit_pid:
            _kill(self.nbdkit_pid, signal.SIGTERM)
            _wait_gone(self.nbdkit_pid)
            self.nbdkit_pid = None

    def shutdown(self) -> None:
        """Clean stop (test teardown): unmount, detach, stop the drive."""
        if Path(self.mnt).is_mount():
            subprocess.run(["sync", "-f", str(self.mnt)], check=False, timeout=60)
        self._detach(lazy=False)
        if Path(self.mnt).is_mount():  # something still held it: do not leave it mounted
            self._detach(lazy=True)
