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
    """nbdkit on a unix socket, restartable on the same socket.

    nbdkit runs daemonised (re-parented to init) and is stopped by the PID in its pid file:
    started in the foreground, it would die with the THREAD that started it (nbdkit sets
    PR_SET_PDEATHSIG), which breaks restarts from a helper thread."""

    def __init__(self, sock_dir: Path, args: list[str], name: str = "") -> None:
        self.args = args
        tag = name or uuid.uuid4().hex[:8]
        self.sock = sock_dir / f"nbdkit-{tag}.sock"
        self.pidfile = sock_dir / f"nbdkit-{tag}.pid"
        self.log = sock_dir / f"nbdkit-{tag}.log"
        self._pid: int | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    @property
    def pid(self) -> int:
        assert self._pid is not None
        return self._pid

    def start(self) -> NbdkitServer:
        for p in (self.sock, self.pidfile):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        with open(self.log, "ab") as log:
            r = subprocess.run(
                [
                    "nbdkit",
                    "--unix",
                    str(self.sock),
                    "--pidfile",
                    str(self.pidfile),
                    "--log=stderr",
                    *self.args,
                ],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                timeout=30,
            )
        if r.returncode != 0:
            raise RuntimeError(f"nbdkit failed to start: {self.log.read_text()[-2000:]}")
        end = time.monotonic() + 10
        while time.monotonic() < end:
            if self.pidfile.exists() and self.pidfile.read_text().strip():
                self._pid = int(self.pidfile.read_text().strip())
                h = nbd.NBD()
                h.connect_uri(self.uri)
                h.shutdown()
                return self
            time.sleep(0.02)
        raise RuntimeError("nbdkit did not write its pid file")

    @property
    def alive(self) -> bool:
        return (
            self._pid is not None
            and Path(f"/proc/{self._pid}").exists()
            and "zombie" not in Path(f"/proc/{self._pid}/status").read_text(errors="replace")
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self._pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, sig)
        end = time.monotonic() + 10
        while time.monotonic() < end and Path(f"/proc/{self._pid}").exists():
            time.sleep(0.02)
        self._pid = None

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


# -- a tiny libvirt guest that writes to its own disk --------------------------------------

GUEST_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk; do
  /bin/busybox insmod /lib/modules/$m.ko
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do /bin/busybox sleep 0.1; i=$((i+1)); done
if [ ! -b /dev/vda ]; then echo FERRYMAN-GUEST-NODISK > /dev/ttyS0; exec /bin/busybox sh; fi
echo FERRYMAN-GUEST-READY > /dev/ttyS0
# Write 64 KiB of random data at one of 256 slots of the first 16 MiB, every 0.2 s,
# synchronously, forever. Everything past 16 MiB stays as the test prepared it.
n=0
while true; do
  slot=$(( (n * 37) % 256 ))
  /bin/busybox dd if=/dev/urandom of=/dev/vda bs=65536 count=1 seek=$slot conv=fsync \
    2>/dev/null
  n=$((n+1))
  /bin/busybox sleep 0.2
done
"""
GUEST_MODULES = [
    "virtio/virtio.ko",
    "virtio/virtio_ring.ko",
    "virtio/virtio_pci_modern_dev.ko",
    "virtio/virtio_pci_legacy_dev.ko",
    "virtio/virtio_pci.ko",
    "block/virtio_blk.ko",
]

# The agent guest: /dev/vda is ext4, mounted; qemu-ga answers on its virtio-serial channel
# (so libvirt can freeze and thaw it); a loop keeps writing files into it.
AGENT_INIT = r"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin /mnt /tmp /var/run
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk \
         virtio_console crc16 mbcache jbd2 crc32c_generic ext4; do
  insmod /lib/modules/$m.ko
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 /dev/vda /mnt || { echo FERRYMAN-GUEST-NODISK > /dev/ttyS0; exec sh; }
port=""
for p in /sys/class/virtio-ports/*; do
  [ "$(cat $p/name)" = org.qemu.guest_agent.0 ] && port=/dev/$(basename $p)
done
/usr/sbin/qemu-ga -m virtio-serial -p "$port" -t /tmp -f /tmp/qga.pid -d
echo FERRYMAN-GUEST-READY > /dev/ttyS0
n=0
while true; do
  dd if=/dev/urandom of=/mnt/f$((n % 64)) bs=65536 count=1 conv=fsync 2>/dev/null
  n=$((n+1))
  sleep 0.2
done
"""
AGENT_MODULES = [
    "char/virtio_console.ko",
    "../lib/crc16.ko",
    "../fs/mbcache.ko",
    "../fs/jbd2/jbd2.ko",
    "../crypto/crc32c_generic.ko",
    "../fs/ext4/ext4.ko",
]


def _copy_with_libs(binary: Path, root: Path) -> None:
    """``binary`` and every shared library it loads, at the same paths under ``root``."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    files = [binary] + [Path(w) for w in out.split() if w.startswith("/")]
    for f in files:
        dst = root / str(f).lstrip("/")
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f.resolve(), dst)


def build_tiny_guest(out: Path, agent: bool = False) -> tuple[Path, Path]:
    """Kernel + initramfs (busybox, virtio modules, the writer init); with ``agent``, also
    ext4 and qemu-ga (the agent guest's init)."""
    import glob
    import io

    out.mkdir(parents=True, exist_ok=True)
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    if not kernels or not Path("/usr/bin/busybox").exists():
        pytest.fail("needs a kernel in /boot and busybox-static (scripts/test installs them)")
    kernel = Path(kernels[-1])
    kver = kernel.name.removeprefix("vmlinuz-")
    moddir = Path(f"/lib/modules/{kver}/kernel/drivers")
    root = out / "root"
    shutil.rmtree(root, ignore_errors=True)
    (root / "bin").mkdir(parents=True)
    (root / "lib" / "modules").mkdir(parents=True)
    shutil.copy("/usr/bin/busybox", root / "bin" / "busybox")
    for m in GUEST_MODULES + (AGENT_MODULES if agent else []):
        shutil.copy(moddir / m, root / "lib" / "modules" / Path(m).name)
    if agent:
        if not Path("/usr/sbin/qemu-ga").exists():
            pytest.fail("needs qemu-guest-agent on the host (scripts/test installs it)")
        _copy_with_libs(Path("/usr/sbin/qemu-ga"), root)
    (root / "init").write_text(AGENT_INIT if agent else GUEST_INIT)
    os.chmod(root / "init", 0o755)
    initrd = out / ("initrd-agent.cpio" if agent else "initrd.cpio")
    files = subprocess.run(
        ["find", "."], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    with open(initrd, "wb") as f:
        subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet"],
            cwd=root,
            input=files.encode(),
            stdout=f,
            check=True,
        )
    k = out / "vmlinuz"
    if not k.exists():
        shutil.copy(kernel, k)
    for p in (k, initrd):
        os.chmod(p, 0o644)
    _ = io
    return k, initrd


class TinyGuest:
    def __init__(self, name: str, dom: Any, disk: Path, serial: Path) -> None:
        self.name, self.dom, self.disk, self.serial = name, dom, disk, serial

    @property
    def uuid(self) -> str:
        return str(self.dom.UUIDString())

    def wait_ready(self, timeout: float = 300.0) -> None:  # TCG on a busy host is slow
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = self.serial.read_bytes() if self.serial.exists() else b""
            if b"FERRYMAN-GUEST-READY" in out:
                return
            if b"FERRYMAN-GUEST-NODISK" in out:
                raise RuntimeError(f"guest has no /dev/vda: {out[-2000:]!r}")
            if b"Kernel panic" in out:
                raise RuntimeError(f"guest kernel panicked: {out[-2000:]!r}")
            time.sleep(0.5)
        raise TimeoutError(f"guest did not boot: {self.serial.read_bytes()[-2000:]!r}")


@pytest.fixture
def tiny_guest(dp_dir: Path) -> Iterator[Callable[..., TinyGuest]]:
    """tiny_guest(disk_size, chunks) -> a running type='qemu' domain whose init writes random
    64 KiB blocks into the first 16 MiB of /dev/vda (qcow2) in a loop. Destroyed and
    undefined (checkpoint metadata included) afterwards."""
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open("qemu:///system")
    made: list[TinyGuest] = []
    gdir = dp_dir / "guest"
    gdir.mkdir()
    os.chmod(gdir, 0o777)
    kernel, initrd = build_tiny_guest(gdir)

    def make(
        disk_size: int = 64 * MiB,
        chunks: list[tuple[int, int, int]] = (),  # type: ignore[assignment]
        agent: bool = False,
    ) -> TinyGuest:
        rd = build_tiny_guest(gdir, agent=True)[1] if agent else initrd
        name = f"fm-test-{uuid.uuid4().hex[:8]}"
        h = uuid.uuid4().hex
        mac = f"{h[0:2]}:{h[2:4]}:{h[4:6]}"
        disk = gdir / f"{name}.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(disk), str(disk_size)], check=True
        )
        if agent:  # an ext4 filesystem the guest mounts and writes files into
            raw = gdir / "fs.raw"
            subprocess.run(["truncate", "-s", str(disk_size), str(raw)], check=True)
            subprocess.run(["mkfs.ext4", "-q", "-F", str(raw)], check=True)
            subprocess.run(
                ["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(disk)],
                check=True,
            )
            raw.unlink()
        elif chunks:
            raw = gdir / "fill.raw"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "raw", str(raw), str(disk_size)], check=True
            )
            write_chunks(raw, list(chunks))
            subprocess.run(
                ["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(raw), str(disk)],
                check=True,
            )
            raw.unlink()
        os.chmod(disk, 0o666)
        serial = gdir / f"{name}.serial"
        channel = (
            "\n    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/>"
            "</channel>"
            if agent
            else ""
        )
        # no_timer_check: under TCG on a loaded host the kernel's IO-APIC timer check fails
        # ("IO-APIC + timer doesn't work") and it panics; the check is meaningless in a VM.
        xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>160</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel><initrd>{rd}</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 no_timer_check</cmdline></os>
  <on_reboot>destroy</on_reboot>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{disk}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{serial}'/></serial>{channel}
    <interface type='user'><mac address='52:54:00:{mac}'/>
      <model type='virtio'/></interface>
  </devices>
</domain>"""
        dom = conn.defineXML(xml)
        g = TinyGuest(name, dom, disk, serial)
        made.append(g)
        dom.create()
        return g

    yield make
    for g in made:
        with contextlib.suppress(libvirt.libvirtError):
            if g.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE:
                g.dom.abortJob()
        with contextlib.suppress(libvirt.libvirtError):
            g.dom.destroy()
        with contextlib.suppress(libvirt.libvirtError):
            g.dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
    conn.close()


# -- proofs and a killable engine ------------------------------------------------------------


def assert_ranges_equal(
    image: Path, source_uri: str, ranges: list[tuple[int, int]], sock_dir: Path, fmt: str = "qcow2"
) -> int:
    """Every (offset, length) range reads the same from the source and from ``image``
    (typically a partial overlay after a crash). Returns the bytes compared."""
    from appliance.datapath import extents as ex
    from appliance.datapath.copier import connect

    total = 0
    with QemuNbd(image, sock_dir, read_only=True, fmt=fmt) as rd:
        a = connect(source_uri)
        b = connect(rd.uri, timeout=60)
        for off, n in ex.coalesce_ranges(ranges):
            pos = off
            while pos < off + n:
                k = min(MiB, off + n - pos)
                assert a.pread(k, pos) == b.pread(k, pos), f"journaled range at {pos} differs"
                pos += k
                total += k
    return total


class FileJournal:
    """A Journal that survives SIGKILL: one fsync'd line per call."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def done(self, disk_key: str, offset: int, length: int) -> None:
        with open(self.path, "a") as f:
            f.write(f"{disk_key} {offset} {length}\n")
            f.flush()
            os.fsync(f.fileno())

    def ranges(self, disk_key: str = "vda") -> list[tuple[int, int]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == disk_key:
                out.append((int(parts[1]), int(parts[2])))
        return out


ENGINE_CHILD = r"""
import json, sys, threading
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from appliance.datapath.chain import DiskChain
from appliance.datapath.copier import RetryPolicy
from appliance.replication import sync_disks
from appliance.sources.nbd import NbdSource
from tests.datapath_fixtures import FileJournal
a = json.loads(sys.argv[1])
journal = FileJournal(Path(a["journal"]))
src = NbdSource({"disks": {"vda": a["uri"]}, "snapshot_id": a["snapshot_id"]})
session = src.open_session(src.ref(), a.get("token"))
res = sync_disks(session, {"vda": DiskChain(Path(a["chain"]))}, point_name=a["point"],
                   socket_dir=Path(a["sock"]), journal=journal,
                   resume_from={"vda": journal.ranges()}, **a.get("opts", {}))
print(json.dumps([r.as_dict() for r in res]))
"""


def spawn_engine(args: dict[str, Any]) -> subprocess.Popen[str]:
    """The sync engine in a child process (to SIGKILL it): syncs NBD args['uri'] into the
    chain at args['chain'], journaling into args['journal'], resuming from it."""
    import json
    import sys

    repo = str(Path(__file__).resolve().parents[1])
    return subprocess.Popen(
        [sys.executable, "-c", ENGINE_CHILD, json.dumps(args), repo],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def writers_of(image: Path) -> list[int]:
    """PIDs of qemu-nbd processes serving ``image`` (to prove none is left behind)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"qemu-nbd") and str(image).encode() in cmd:
            out.append(int(d.name))
    return out


HANG_PLUGIN = r"""
import os, random, time
import nbdkit

API_VERSION = 2
size = 0
hang = ""


def config(key, value):
    global size, hang
    if key == "size":
        size = int(value)
    elif key == "hang-file":
        hang = value


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return size


def block_size(h):
    return (1, 65536, 32 * 1024 * 1024)


def pread(h, buf, offset, flags):
    # While the hang file exists every read blocks: the source "hangs" (row 4).
    while hang and os.path.exists(hang):
        time.sleep(0.05)
    n = len(buf)
    pos = 0
    while pos < n:
        blk = (offset + pos) // 65536
        data = random.Random(blk).randbytes(65536)
        start = (offset + pos) % 65536
        k = min(65536 - start, n - pos)
        buf[pos:pos + k] = data[start:start + k]
        pos += k
"""


def hang_plugin(directory: Path) -> Path:
    """An nbdkit python plugin serving reproducible random data whose reads block while a
    'hang-file' exists (the pause filter of nbdkit 1.32 sometimes dies on resume once the
    client has abandoned paused connections, which is exactly what a timeout does)."""
    p = directory / "hangplugin.py"
    p.write_text(HANG_PLUGIN)
    return p
