"""Verify a converted guest by inspecting it again.

Checks what must hold for a boot on virtio: the boot kernel's initramfs holds virtio drivers,
every fstab entry names a device of the disk, no /dev/sd* device names are left in fstab or on
the kernel line, the other hypervisor's tools are gone, no MAC bindings remain. Booting in a
test run is the final proof; this is the cheap one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.convert import linuxconf
from appliance.convert.gfs import DEFAULT_TIMEOUT
from appliance.convert.inspect import Inspection, inspect_image

NETWORK_FS = ("nfs", "nfs4", "cifs", "smbfs", "glusterfs", "ceph", "fuse.sshfs")


@dataclass
class VerifyReport:
    ok: bool
    problems: list[str] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check(insp: Inspection) -> VerifyReport:
    problems: list[str] = []
    checked: list[str] = []
    if insp.os_type == "windows":
        checked.append("windows: virtio services registered")
        w = insp.windows
        if w is None or not ({"viostor", "vioscsi"} & {s.lower() for s in w.virtio_services}):
            problems.append("windows: no viostor or vioscsi service in the SYSTEM hive")
        return VerifyReport(not problems, problems, checked)
    if insp.os_type != "linux":
        return VerifyReport(False, [f"{insp.image}: no operating system found"], checked)
    k = insp.default_kernel
    checked.append("initramfs of the boot kernel holds virtio_blk or virtio_scsi")
    if k is None:
        problems.append("no kernel found")
    elif not k.initrd_has_virtio:
        problems.append(f"the initramfs of {k.version} ({k.initrd}) has no virtio drivers")
    checked.append("every fstab entry resolves to a device of the disks")
    for e in insp.fstab:
        if e.fstype in NETWORK_FS or "noauto" in e.options or "nofail" in e.options:
            continue
        if e.resolved is None:
            problems.append(f"fstab: {e.spec} on {e.mountpoint} names no device of the disks")
        if linuxconf.UNSTABLE_DEVICE.match(e.spec):
            problems.append(f"fstab: {e.mountpoint} still mounted by device name {e.spec}")
    checked.append("kernel line names root by UUID, label or LVM path")
    cmd = insp.kernel_cmdline or ""
    for tok in cmd.split():
        if tok.startswith("root=") and linuxconf.UNSTABLE_DEVICE.match(tok[5:]):
            problems.append(f"kernel line: {tok} is a device name")
    checked.append("no hypervisor tools of the source platform")
    problems += [f"still installed: {t}" for t in insp.hypervisor_tools]
    checked.append("no MAC bindings in network configuration")
    for nc in insp.network:
        if "ferryman" in nc.path:
            continue  # bindings to the NEW hardware, written from the plan
        problems += [f"{nc.path}: MAC binding left: {b}" for b in nc.mac_bindings]
    return VerifyReport(not problems, problems, checked)


def verify(overlay: Path, *, timeout: float = DEFAULT_TIMEOUT) -> VerifyReport:
    """Re-inspect a converted overlay (read-only) and check it."""
    return check(inspect_image(overlay, timeout=timeout))
