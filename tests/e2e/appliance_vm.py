"""Boot the appliance image under TCG for the e2e tests: overlay, data disk, seed disk, SSH.

The image comes from images/appliance (cached; the first build takes ~15-20 min). The VM runs
from a throw-away overlay with a 4 GiB empty data disk (the first boot must pick it as the
volume store) and a seed disk labelled FMSEED that carries firstboot.conf and the throw-away
SSH keys of `op` and `admin`. QEMU is stopped by its PID, nothing else.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HOSTNAME = "fm-e2e"
BOOT_TIMEOUT_S = 420.0  # ~60-90 s under TCG on an idle machine; the CI machine is shared
SSH_OPTS = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=20",
    "-o",
    "IdentitiesOnly=yes",
]
ANSI = re.compile(
    rb"\x1b(\[[0-9;?<>=]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78DEHMc])"
)


_BUILT: list[Path] = []


def build_image() -> Path:
    """The appliance image, built (or found in the cache) once per test session: others edit
    the checkout meanwhile, and each edit to an input would be a new image (minutes)."""
    if _BUILT and _BUILT[-1].exists():
        return _BUILT[-1]
    sys.path.insert(0, str(ROOT / "images" / "appliance"))
    import imagebuild

    _BUILT.append(Path(imagebuild.build()))
    return _BUILT[-1]


def make_bundle(out_dir: Path, version: str) -> Path:
    sys.path.insert(0, str(ROOT / "images" / "appliance"))
    import imagebuild

    return Path(imagebuild.bundle(out_dir, version=version))


def make_ova(image: Path, out_dir: Path) -> Path:
    sys.path.insert(0, str(ROOT / "images" / "appliance"))
    import imagebuild

    return Path(imagebuild.ova(image, out_dir))


def plain(data: bytes) -> str:
    """Terminal output without escape sequences, for searching."""
    return ANSI.sub(b"", data).decode("utf-8", errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Appliance:
    work: Path
    proc: subprocess.Popen[bytes]
    port: int
    key: Path

    @property
    def serial(self) -> Path:
        return self.work / "serial.log"

    def ssh_argv(self, user: str, *extra: str) -> list[str]:
        return [
            "ssh",
            *SSH_OPTS,
            "-i",
            str(self.key),
            "-p",
            str(self.port),
            *extra,
            f"{user}@127.0.0.1",
        ]

    def copy_opts(self) -> list[str]:
        """Options for sftp and scp (their port flag is -P)."""
        return [*SSH_OPTS, "-i", str(self.key), "-P", str(self.port)]

    def ssh(
        self, user: str, command: str, *, timeout: float = 120, stdin: bytes = b""
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*self.ssh_argv(user), command], input=stdin, capture_output=True, timeout=timeout
        )

    def admin(self, command: str, *, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        r = self.ssh("admin", command, timeout=timeout)
        return subprocess.CompletedProcess(
            r.args,
            r.returncode,
            r.stdout.decode(errors="replace"),
            r.stderr.decode(errors="replace"),
        )

    def scp_to(self, src: Path, dest: str) -> None:
        subprocess.run(
            [
                "scp",
                *SSH_OPTS,
                "-i",
                str(self.key),
                "-P",
                str(self.port),
                str(src),
                f"admin@127.0.0.1:{dest}",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )

    def wait_ssh(self, timeout: float) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise AssertionError(f"qemu exited with {self.proc.returncode}; see {self.serial}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                if self.ssh("admin", "true", timeout=30).returncode == 0:
                    return time.monotonic() - start
            time.sleep(3)
        raise AssertionError(f"no SSH login as admin within {timeout:.0f} s; see {self.serial}")

    def wait_serial(self, pattern: bytes, timeout: float) -> bytes:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            data = self.serial.read_bytes() if self.serial.exists() else b""
            if pattern in data:
                return data
            time.sleep(2)
        raise AssertionError(f"{pattern!r} not on the serial console within {timeout:.0f} s")


DEFAULT_FIRSTBOOT = f"hostname={HOSTNAME}\nnetwork=dhcp\ntimezone=UTC\ndata_disk=auto\n"


def _seed_disk(work: Path, pub: str, firstboot: str) -> Path:
    seed = work / "seed"
    seed.mkdir()
    (seed / "firstboot.conf").write_text(firstboot)
    (seed / "operator.keys").write_text(pub)
    (seed / "admin.keys").write_text(pub)
    img = work / "seed.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-L", "FMSEED", "-d", str(seed), str(img), "16M"], check=True
    )
    return img


@contextlib.contextmanager
def running(
    image: Path,
    work: Path,
    *,
    firstboot: str = DEFAULT_FIRSTBOOT,
    data_disk: bool = True,
    extra_disks: tuple[Path, ...] = (),
    guest_ip: str = "",
) -> Iterator[Appliance]:
    """Boot ``image`` from an overlay with a seed disk (``firstboot`` is its firstboot.conf,
    the throw-away key goes to both accounts), an empty 4 GiB data disk unless ``data_disk``
    is False, then ``extra_disks`` (raw), and SSH forwarded to ``guest_ip`` (default: the
    address slirp's DHCP gives)."""
    work.mkdir(parents=True, exist_ok=True)
    key = work / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    seed = _seed_disk(work, (work / "id_ed25519.pub").read_text(), firstboot)
    overlay = work / "appliance.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(overlay)],
        check=True,
    )
    disks = [f"file={overlay},format=qcow2,if=virtio"]
    if data_disk:
        data = work / "data.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(data), "4G"], check=True)
        disks.append(f"file={data},format=qcow2,if=virtio")
    disks += [f"file={d},format=raw,if=virtio" for d in extra_disks]
    disks.append(f"file={seed},format=raw,if=virtio,readonly=on")
    port = _free_port()
    argv = [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        "2",
        "-m",
        "3072",
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        f"file:{work / 'serial.log'}",
        *(arg for d in disks for arg in ("-drive", d)),
        "-netdev",
        f"user,id=n0,hostfwd=tcp:127.0.0.1:{port}-{guest_ip}:22",
        "-device",
        "virtio-net-pci,netdev=n0",
    ]
    (work / "qemu.argv").write_text(shlex.join(argv) + "\n")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=open(work / "qemu.err", "wb"))  # noqa: SIM115
    vm = Appliance(work, proc, port, key)
    try:
        yield vm
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
