"""Is KVM usable here? A timed probe that boots the host kernel and watches it run.

``/dev/kvm`` existing proves nothing: with nested virtualisation, ``-cpu host`` can abort
(MSR 0x10a) and other CPU models hang after "Booting from ROM". So the probe boots a kernel
for real, with a timeout, under KVM and then under TCG, and the verdict decides the
libguestfs backend settings and the libvirt domain type for everything the daemon starts.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from typing import Any

from appliance.proc import die_with_parent

# The kernel got far enough to look for a root file system: the CPU and the accelerator work.
KERNEL_RAN = re.compile(rb"(VFS: Unable to mount root|Kernel panic|Run /init|Freeing unused)")
KVM_TIMEOUT_S = 25.0  # a working KVM reaches the root-fs panic in ~2 s; a hang shows nothing
TCG_TIMEOUT_S = 90.0  # TCG needs ~5-15 s on 2 cores; generous for a loaded machine


@dataclass
class ProbeResult:
    accel: str  # "kvm" | "tcg" | "none"
    kvm_ok: bool
    kvm_detail: str
    tcg_ok: bool
    tcg_detail: str
    kernel: str
    seconds: float

    @property
    def domain_type(self) -> str:
        """libvirt <domain type=...> for VMs the daemon starts."""
        return "kvm" if self.accel == "kvm" else "qemu"

    @property
    def guestfs_settings(self) -> str:
        """LIBGUESTFS_BACKEND_SETTINGS (must be set in the environment: virt-v2v opens its own
        handles, so a setting on our handle would not reach them)."""
        return "" if self.accel == "kvm" else "force_tcg"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["domain_type"] = self.domain_type
        return d


def find_kernel() -> str | None:
    kernels = sorted(glob.glob("/boot/vmlinuz-*"))
    return kernels[-1] if kernels else None


def _boot(kernel: str, accel: str, timeout: float) -> tuple[bool, str]:
    cmd = [
        "qemu-system-x86_64",
        "-accel",
        accel,
        "-m",
        "256",
        "-nographic",
        "-nodefaults",
        "-no-reboot",
        "-serial",
        "stdio",
        "-kernel",
        kernel,
        "-append",
        "console=ttyS0 panic=-1 loglevel=4",
    ]
    if accel == "kvm":
        cmd[3:3] = ["-cpu", "host"]
    start = time.monotonic()
    try:
        p = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
    except FileNotFoundError:
        return False, "qemu-system-x86_64 not installed (apt-get install qemu-system-x86)"
    out = b""
    assert p.stdout is not None
    os.set_blocking(p.stdout.fileno(), False)
    try:
        while time.monotonic() - start < timeout:
            chunk = p.stdout.read(65536) or b""
            out += chunk
            if KERNEL_RAN.search(out):
                return True, f"kernel ran under {accel} in {time.monotonic() - start:.1f} s"
            if p.poll() is not None:
                out += p.stdout.read() or b""
                if KERNEL_RAN.search(out):
                    return True, f"kernel ran under {accel} in {time.monotonic() - start:.1f} s"
                last = out.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                return False, f"qemu exited with {p.returncode}: {last[0][:160]}"
            time.sleep(0.1)
        return False, f"no kernel output under {accel} within {timeout:.0f} s (hang)"
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def probe(kvm_timeout: float = KVM_TIMEOUT_S, tcg_timeout: float = TCG_TIMEOUT_S) -> ProbeResult:
    start = time.monotonic()
    kernel = find_kernel()
    if kernel is None:
        msg = "no kernel under /boot (apt-get install linux-image-amd64)"
        return ProbeResult("none", False, msg, False, msg, "", 0.0)
    if not os.path.exists("/dev/kvm"):
        kvm_ok, kvm_detail = False, "/dev/kvm does not exist"
    elif not os.access("/dev/kvm", os.R_OK | os.W_OK):
        kvm_ok, kvm_detail = False, "/dev/kvm is not accessible to this user"
    else:
        kvm_ok, kvm_detail = _boot(kernel, "kvm", kvm_timeout)
    tcg_ok, tcg_detail = (
        (True, "not needed: KVM works") if kvm_ok else _boot(kernel, "tcg", tcg_timeout)
    )
    accel = "kvm" if kvm_ok else ("tcg" if tcg_ok else "none")
    return ProbeResult(
        accel, kvm_ok, kvm_detail, tcg_ok, tcg_detail, kernel, round(time.monotonic() - start, 2)
    )


def apply_to_environment(result: ProbeResult) -> None:
    """Make every libguestfs handle and virt-v2v run of this process follow the verdict."""
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    if result.guestfs_settings:
        os.environ["LIBGUESTFS_BACKEND_SETTINGS"] = result.guestfs_settings
    else:
        os.environ.pop("LIBGUESTFS_BACKEND_SETTINGS", None)
