"""Fixtures for data-path tests: throw-away nbdkit and qemu-nbd servers, images, chains.

Every server a fixture starts is stopped by its PID when the test ends, pass or fail.
Wire into tests/conftest.py with ``pytest_plugins = ["tests.datapath_fixtures"]`` (or a
star import). Names: nbdkit_server, qemu_nbd_server, dp_dir, dp_sock_dir, make_image,
make_chain, recording_journal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest

from appliance.datapath.chain import DiskChain
from appliance.datapath.writer import QemuNbd

MiB = 1024 * 1024


class NbdkitServer:
    """nbdkit in the foreground on a unix socket; restartable on the same socket."""

    def __init__(self, sock_dir: Path, args: list[str], name: str = "") -> None:
        self.args = args
        self.sock = sock_dir / f"nbdkit-{name or uuid.uuid4().hex[:8]}.sock"
        self.log = sock_dir / (self.sock.name + ".log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> NbdkitServer:
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    "nbdkit",
                    "-f",
                    "-v" if os.environ.get("NBDKIT_DEBUG") else "--exit-with-parent",
                    "--unix",
                    str(self.sock),
                    *self.args,
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nbdkit exited: {self.log.read_text()[-2000:]}")
            if self.sock.exists():
                try:
                    h = nbd.NBD()
                    h.connect_uri(self.uri)
                    h.shutdown()
                    return self
                except nbd.Error:
                    pass
            time.sleep(0.02)
        raise RuntimeError("nbdkit did not start")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class RecordingJournal:
    """A Journal that keeps what it was told, in order (the store does this in SQLite)."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, int, int]] = []

    def done(self, disk_key: str, offset: int, length: int) -> None:
        self.entries.append((disk_key, offset, length))

    def ranges(self, disk_key: str) -> list[tuple[int, int]]:
        return [(o, n) for k, o, n in self.entries if k == disk_key]


@pytest.fixture
def dp_dir() -> Iterator[Path]:
    """A scratch directory on a real filesystem (O_DIRECT works), removed afterwards."""
    base = Path(os.environ.get("FERRYMAN_TEST_SCRATCH", "/var/tmp"))
    d = Path(tempfile.mkdtemp(prefix="fm-dp-", dir=base))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def dp_sock_dir(dp_dir: Path) -> Path:
    """Socket directory the libvirt-qemu user can write (backup sockets live here too)."""
    d = dp_dir / "run"
    d.mkdir()
    os.chmod(d, 0o1777)
    return d


@pytest.fixture
def nbdkit_server(dp_sock_dir: Path) -> Iterator[Callable[..., NbdkitServer]]:
    started: list[NbdkitServer] = []

    def make(*args: str, name: str = "", start: bool = True) -> NbdkitServer:
        s = NbdkitServer(dp_sock_dir, list(args), name)
        started.append(s)
        return s.start() if start else s

    yield make
    for s in started:
        s.kill()


@pytest.fixture
def qemu_nbd_server(dp_sock_dir: Path) -> Iterator[Callable[..., QemuNbd]]:
    started: list[QemuNbd] = []

    def make(image: Path, **kw: Any) -> QemuNbd:
        q = QemuNbd(Path(image), dp_sock_dir, **kw).start()
        started.append(q)
        return q

    yield make
    for q in started:
        q.kill()


@pytest.fixture
def make_image(dp_dir: Path) -> Callable[..., Path]:
    """make_image(name, size, chunks=[(offset, length, seed)], fmt='raw'|'qcow2')."""

    def make(
        name: str,
        size: int,
        chunks: list[tuple[int, int, int]] = (),  # type: ignore[assignment]
        fmt: str = "raw",
    ) -> Path:
        p = dp_dir / name
        subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(p), str(size)], check=True)
        if chunks:
            write_chunks(p, chunks, fmt=fmt)
        return p

    return make


def pattern(length: int, seed: int) -> bytes:
    """Incompressible, reproducible bytes."""
    import random

    return random.Random(seed).randbytes(length)


def write_chunks(path: Path, chunks: list[tuple[int, int, int]], fmt: str = "raw") -> None:
    if fmt == "raw":
        with open(path, "r+b") as f:
            for off, n, seed in chunks:
                f.seek(off)
                f.write(pattern(n, seed))
        return
    # qcow2: through qemu-io so persistent dirty bitmaps record the writes. qemu-io writes
    # a repeated byte (-P), which is enough to tell blocks apart.
    cmds: list[str] = []
    for off, n, seed in chunks:
        cmds += ["-c", f"write -P {seed % 255 + 1} {off} {n}"]
    subprocess.run(["qemu-io", "-f", fmt, *cmds, str(path)], check=True, capture_output=True)


@pytest.fixture
def make_chain(dp_dir: Path) -> Callable[[str], DiskChain]:
    def make(disk: str = "vda") -> DiskChain:
        return DiskChain(dp_dir / "volumes" / "m1" / disk)

    return make


@pytest.fixture
def recording_journal() -> RecordingJournal:
    return RecordingJournal()


def images_equal(
    a: str | Path, b: str | Path, fa: str | None = None, fb: str | None = None
) -> subprocess.CompletedProcess[str]:
    """qemu-img compare of two images (files or NBD URIs); exit 0 = identical."""
    args = ["qemu-img", "compare"]
    if fa:
        args += ["-f", fa]
    if fb:
        args += ["-F", fb]
    return subprocess.run([*args, str(a), str(b)], capture_output=True, text=True)


def check_ok(path: Path) -> int:
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(path)], capture_output=True)
    return r.returncode
