"""Boot a disk image under qemu and wait for a marker on its serial console.

Booting is the final proof of a conversion (design.md). Test runs, the conversion tests and the
benchmark all boot the same way: qemu-system-x86_64 with a chosen disk bus and NIC model, the
serial console captured to a file, a regex awaited with a deadline, and the VM always stopped.

TCG is the default because nested KVM does not work on the build machines; ``accel="kvm"`` is
there for hosts where it does. The image is opened with ``-snapshot`` by default so that a boot
never writes the image it proves (guest writes go to a temporary file that qemu discards).
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance.convert.errors import BootError

log = logging.getLogger(__name__)

DiskBus = Literal["sata", "virtio", "ide", "scsi"]
# Lines after which the guest will never reach the marker: stop waiting at once.
FAILURE_PATTERNS = (
    re.compile(r"Gave up waiting for root"),
    re.compile(r"Kernel panic"),
    re.compile(r"\(initramfs\) "),
    re.compile(r"You are in emergency mode"),
)
MARKER = re.compile(r"FERRYMAN-BOOT-OK (?P<fields>[^\r\n]*)")
POLL_INTERVAL = 0.5  # seconds between reads of the console file
STOP_GRACE = 5.0  # seconds between SIGTERM and SIGKILL of qemu
DEFAULT_MEMORY_MIB = 1024  # a minimal Debian boots in 512; initramfs unpacking likes more


@dataclass
class BootResult:
    booted: bool
    reason: str  # "marker", "failure: <line>", "timeout after N s", "qemu exited (status N)"
    seconds: float
    console: str  # path of the captured serial console
    marker_line: str | None = None
    fields: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_marker(line: str) -> dict[str, str]:
    """'root=/dev/vda1 block=virtio_blk ...' -> {'root': '/dev/vda1', 'block': 'virtio_blk', ...}"""
    out: dict[str, str] = {}
    for tok in line.split():
        key, sep, value = tok.partition("=")
        if sep:
            out[key] = value
    return out


def qemu_command(
    image: Path,
    *,
    console: Path,
    disk_bus: DiskBus = "virtio",
    nic_model: str = "virtio-net-pci",
    mac: str = "52:54:00:fe:00:01",
    memory_mib: int = DEFAULT_MEMORY_MIB,
    accel: str = "tcg",
    snapshot: bool = True,
    image_format: str = "qcow2",
) -> list[str]:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        raise BootError(
            "qemu-system-x86_64 is not installed", hint="install the Debian package qemu-system-x86"
        )
    drive = f"file={image},if=none,id=disk0,format={image_format},cache=unsafe"
    cmd = [
        qemu,
        "-machine",
        f"pc,accel={accel}",
        "-m",
        str(memory_mib),
        "-smp",
        "1",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-monitor",
        "none",
        "-chardev",
        f"file,id=ser0,path={console}",
        "-serial",
        "chardev:ser0",
        "-vga",
        "std",
        "-drive",
        drive,
    ]
    if snapshot:
        cmd.append("-snapshot")
    if disk_bus == "virtio":
        cmd += ["-device", "virtio-blk-pci,drive=disk0,bootindex=0"]
    elif disk_bus == "sata":
        cmd += ["-device", "ahci,id=ahci0", "-device", "ide-hd,drive=disk0,bus=ahci0.0,bootindex=0"]
    elif disk_bus == "ide":
        cmd += ["-device", "ide-hd,drive=disk0,bus=ide.0,bootindex=0"]
    elif disk_bus == "scsi":
        cmd += [
            "-device",
            "virtio-scsi-pci,id=scsi0",
            "-device",
            "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=0",
        ]
    else:
        raise BootError(f"unknown disk bus {disk_bus!r}", hint="use sata, virtio, ide or scsi")
    # User networking without a route out: an isolated network like a test run's.
    cmd += ["-netdev", "user,id=net0,restrict=on", "-device", f"{nic_model},netdev=net0,mac={mac}"]
    return cmd


def boot(
    image: Path,
    *,
    console: Path,
    disk_bus: DiskBus = "virtio",
    nic_model: str = "virtio-net-pci",
    mac: str = "52:54:00:fe:00:01",
    timeout: float = 240.0,
    marker: re.Pattern[str] = MARKER,
    memory_mib: int = DEFAULT_MEMORY_MIB,
    accel: str = "tcg",
    snapshot: bool = True,
    image_format: str = "qcow2",
    cancel: threading.Event | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> BootResult:
    """Boot ``image``, wait up to ``timeout`` s for ``marker`` on the serial console, stop.

    Returns a BootResult whether or not the guest booted; raises BootError only when qemu
    cannot be started at all. The VM is stopped in every case (marker, failure line, timeout,
    cancel, exception).
    """
    console.parent.mkdir(parents=True, exist_ok=True)
    console.write_bytes(b"")
    cmd = qemu_command(
        image,
        console=console,
        disk_bus=disk_bus,
        nic_model=nic_model,
        mac=mac,
        memory_mib=memory_mib,
        accel=accel,
        snapshot=snapshot,
        image_format=image_format,
    )
    log.info("booting %s on %s/%s: %s", image, disk_bus, nic_model, " ".join(cmd))
    stderr_path = console.with_suffix(console.suffix + ".qemu-stderr")
    t0 = clock()
    with stderr_path.open("wb") as errf:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=errf, stderr=errf)
        except OSError as e:
            raise BootError(f"cannot start qemu for {image}: {e}") from e
    try:
        while True:
            elapsed = clock() - t0
            text = console.read_text(errors="replace")
            m = marker.search(text)
            if m:
                line = m.group(0).strip()
                fields = parse_marker(m.group("fields")) if "fields" in marker.groupindex else {}
                return BootResult(True, "marker", elapsed, str(console), line, fields)
            for pat in FAILURE_PATTERNS:
                f = pat.search(text)
                if f:
                    start = text.rfind("\n", 0, f.start()) + 1
                    end = text.find("\n", f.end())
                    what = text[start : end if end >= 0 else len(text)].strip()
                    return BootResult(False, f"failure: {what}", elapsed, str(console))
            status = proc.poll()
            if status is not None:
                err = stderr_path.read_text(errors="replace").strip()[-400:]
                return BootResult(
                    False, f"qemu exited (status {status}) {err}".strip(), elapsed, str(console)
                )
            if elapsed >= timeout:
                return BootResult(False, f"timeout after {timeout:.0f} s", elapsed, str(console))
            if cancel is not None and cancel.is_set():
                return BootResult(False, "cancelled", elapsed, str(console))
            time.sleep(POLL_INTERVAL)
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
