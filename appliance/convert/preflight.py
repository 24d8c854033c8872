"""The preflight verdict: can this guest be converted, by which backend, and what will change.

A blocker stops the conversion and says what to do; a warning is something the operator should
know (tools that will be removed, MAC bindings that will be dropped). The verdict is computed
from an Inspection alone, so it is cheap and can be shown before anything is written.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance.convert.inspect import Inspection
from appliance.units import MiB, human_bytes

Backend = Literal["builtin", "virt-v2v"]
MIN_FREE_ROOT = 100 * MiB  # bytes; update-initramfs and grub-mkconfig write a few MiB
MIN_FREE_BOOT = 40 * MiB  # bytes; a new initramfs of a minimal Debian kernel is ~10-40 MiB
SUPPORTED_ARCHES = ("x86_64",)
BUILTIN_FAMILIES = ("debian", "rhel", "suse")
# virt-v2v needs these, beside virtio-win, whenever a Windows conversion installs a first-boot
# script (it copies them into the guest); Debian ships neither.
FIRSTBOOT_TOOLS = ("rhsrvany.exe", "pnp_wait.exe")
WINDOWS_BRING = (
    "Windows conversion needs what Debian cannot ship: (1) virtio-win, the ISO or its unpacked "
    "tree (virtio-win-*.iso from the virtio-win project), holding viostor, vioscsi and NetKVM "
    "for this Windows version, configured as virtio_win; (2) rhsrvany.exe and pnp_wait.exe "
    "(from the rhsrvany / mingw-srvany project, as in virt-v2v's /usr/share/virt-tools) in a "
    "directory configured as virt_tools_dir"
)


@dataclass
class Finding:
    code: str
    message: str
    fix: str = ""


@dataclass
class Verdict:
    backend: Backend
    blockers: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.blockers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def default_backend(insp: Inspection) -> Backend:
    return "virt-v2v" if insp.os_type == "windows" else "builtin"


def virt_v2v_available() -> bool:
    return shutil.which("virt-v2v-in-place") is not None


def preflight(
    insp: Inspection,
    *,
    backend: Backend | None = None,
    virtio_win: Path | None = None,
    virt_tools_dir: Path | None = None,
) -> Verdict:
    b: Backend = backend or default_backend(insp)
    v = Verdict(backend=b)
    block, warn = v.blockers.append, v.warnings.append
    name = insp.hostname or insp.image

    if insp.luks_locked:
        block(
            Finding(
                "luks_no_key",
                f"{name}: encrypted volumes without a key: {', '.join(insp.luks_locked)}",
                "add the LUKS passphrase for each device to the machine's settings",
            )
        )
    if insp.dynamic_disks:
        block(
            Finding(
                "dynamic_disks",
                f"{name}: Windows dynamic disks (LDM) cannot be converted",
                "convert the disks to basic disks in Windows before replication",
            )
        )
    if insp.os_type not in ("linux", "windows"):
        if not insp.luks_locked:
            block(
                Finding(
                    "unknown_os",
                    f"{insp.image}: no operating system found",
                    "check that the restore point holds the system disk (and all its disks)",
                )
            )
        return v
    if insp.arch not in SUPPORTED_ARCHES:
        block(
            Finding(
                "arch",
                f"{name}: architecture {insp.arch!r} is not supported",
                "only x86_64 guests run on this appliance",
            )
        )
    if b == "virt-v2v" and not virt_v2v_available():
        block(
            Finding(
                "no_virt_v2v",
                "virt-v2v-in-place is not installed on the appliance",
                "install the Debian package virt-v2v, or choose the built-in backend (Linux)",
            )
        )
    if insp.os_type == "windows":
        _windows(insp, b, v, virtio_win, virt_tools_dir)
    else:
        _linux(insp, b, v)
    if insp.free_root is not None and insp.free_root < MIN_FREE_ROOT:
        block(
            Finding(
                "free_space",
                f"{name}: only {human_bytes(insp.free_root)} free on / "
                f"(conversion needs {human_bytes(MIN_FREE_ROOT)})",
                "free space in the source machine and take a new restore point",
            )
        )
    if insp.free_boot is not None and insp.free_boot < MIN_FREE_BOOT:
        block(
            Finding(
                "free_space_boot",
                f"{name}: only {human_bytes(insp.free_boot)} free on /boot "
                f"(a new initramfs needs {human_bytes(MIN_FREE_BOOT)})",
                "remove old kernels in the source machine and take a new restore point",
            )
        )
    if insp.firmware == "uefi":
        warn(
            Finding(
                "uefi",
                f"{name} boots with UEFI",
                "give the machine UEFI firmware (OVMF) in the plan",
            )
        )
    return v


def _windows(
    insp: Inspection,
    b: Backend,
    v: Verdict,
    virtio_win: Path | None,
    virt_tools_dir: Path | None,
) -> None:
    name = insp.hostname or insp.image
    if b == "builtin":
        v.blockers.append(
            Finding(
                "windows_builtin",
                f"{name}: the built-in converter handles Linux only",
                "use the virt-v2v backend for Windows guests",
            )
        )
        return
    missing = []
    if virtio_win is None or not virtio_win.exists():
        missing.append(
            "virtio-win (not configured)"
            if virtio_win is None
            else f"virtio-win (configured as {virtio_win}, which does not exist)"
        )
    if virt_tools_dir is None or not all((virt_tools_dir / t).exists() for t in FIRSTBOOT_TOOLS):
        where = f" in {virt_tools_dir}" if virt_tools_dir else ""
        missing.append(f"{' and '.join(FIRSTBOOT_TOOLS)}{where}")
    if missing:
        v.blockers.append(
            Finding(
                "windows_needs_virtio_win",
                f"{name}: cannot convert Windows: missing {'; '.join(missing)}",
                WINDOWS_BRING,
            )
        )
    if insp.windows and insp.windows.vmware_services:
        v.warnings.append(
            Finding(
                "hypervisor_tools",
                f"{name}: VMware services {', '.join(insp.windows.vmware_services)} present",
                "virt-v2v disables what it knows; uninstall VMware Tools after the first boot",
            )
        )


def _linux(insp: Inspection, b: Backend, v: Verdict) -> None:
    name = insp.hostname or insp.image
    block, warn = v.blockers.append, v.warnings.append
    if b == "builtin" and insp.family not in BUILTIN_FAMILIES:
        block(
            Finding(
                "family",
                f"{name}: the built-in converter does not know distribution {insp.distro!r}",
                "use the virt-v2v backend for this machine",
            )
        )
    if not insp.kernels:
        block(
            Finding(
                "no_kernel",
                f"{name}: no kernel found under /boot",
                "check that /boot is on the replicated disks",
            )
        )
    elif not any(k.has_virtio for k in insp.kernels):
        block(
            Finding(
                "no_virtio_kernel",
                f"{name}: no installed kernel has virtio drivers "
                f"({', '.join(k.version for k in insp.kernels)})",
                "install a kernel with virtio_blk and virtio_pci in the source machine",
            )
        )
    elif insp.default_kernel and not insp.default_kernel.has_virtio:
        warn(
            Finding(
                "default_kernel",
                f"{name}: the default kernel {insp.default_kernel.version} lacks virtio",
                "the converter will make a kernel with virtio the default",
            )
        )
    if insp.bootloader != "grub2":
        block(
            Finding(
                "bootloader",
                f"{name}: boot loader {insp.bootloader or 'none found'} is not supported",
                "both backends need GRUB 2 in the guest",
            )
        )
    for k in insp.kernels:
        if k.default and not k.initrd_has_virtio:
            warn(
                Finding(
                    "initramfs",
                    f"{name}: the initramfs of {k.version} has no virtio drivers",
                    "the conversion rebuilds it with the guest's own tool",
                )
            )
    for tool in insp.hypervisor_tools:
        warn(Finding("hypervisor_tools", f"{name}: {tool} installed", "it will be removed"))
    for nc in insp.network:
        for binding in nc.mac_bindings:
            warn(
                Finding(
                    "mac_binding",
                    f"{name}: {nc.path} binds to a MAC address: {binding}",
                    "the binding will be dropped",
                )
            )
    for e in insp.fstab:
        if e.resolved is None and e.fstype != "swap" and "noauto" not in e.options:
            warn(
                Finding(
                    "fstab",
                    f"{name}: fstab entry {e.spec} on {e.mountpoint} names no disk of the "
                    "restore point",
                    "add the missing disk to the machine or mark the entry nofail",
                )
            )
        elif e.resolved and e.spec.startswith("/dev/sd"):
            warn(
                Finding(
                    "fstab_device_name",
                    f"{name}: fstab mounts {e.mountpoint} by device name {e.spec}",
                    "it will be changed to UUID=",
                )
            )
