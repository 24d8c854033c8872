"""Inspection, preflight and the damaged-disk row, with real libguestfs (TCG).

Each test launches the libguestfs appliance once (~20-40 s under TCG).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.convert.errors import DamagedDisk, PreflightRefused
from appliance.convert.inspect import inspect_image
from appliance.convert.preflight import preflight

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_inspect_vmware_like(vmware_like_image: Path) -> None:
    insp = inspect_image(vmware_like_image)
    assert (insp.os_type, insp.distro, insp.family, insp.major) == ("linux", "debian", "debian", 12)
    assert insp.arch == "x86_64" and insp.hostname == "vmware-like"
    assert insp.bootloader == "grub2" and insp.firmware == "bios"
    assert insp.kernel_cmdline is not None and "root=/dev/sda1" in insp.kernel_cmdline
    k = insp.default_kernel
    assert k is not None and k.has_virtio and not k.initrd_has_virtio
    assert [e.spec for e in insp.fstab] == ["/dev/sda1"]
    assert insp.fstab[0].resolved == "/dev/sda1"
    assert insp.hypervisor_tools == ["open-vm-tools (vmware)"]
    assert insp.free_root is not None and insp.free_root > 1024**3
    assert not insp.luks and not insp.lvm and not insp.dynamic_disks
    d = insp.to_dict()
    assert d["kernels"][0]["initrd_has_virtio"] is False

    v = preflight(insp)
    assert v.ok and v.backend == "builtin"
    codes = {w.code for w in v.warnings}
    assert {"hypervisor_tools", "initramfs", "fstab_device_name"} <= codes


def test_inspect_lvm_static(lvm_static_image: Path) -> None:
    insp = inspect_image(lvm_static_image)
    assert insp.lvm and insp.mountpoints["/"] == "/dev/vg0/root"
    assert insp.mountpoints["/boot"] == "/dev/sda1" and insp.free_boot is not None
    assert {e.spec: e.resolved for e in insp.fstab} == {
        "UUID=5e1f2a3b-0c4d-4e5f-8a9b-000000000002": "/dev/vg0/root",
        "LABEL=boot": "/dev/sda1",
    }
    ifupdown = next(n for n in insp.network if n.kind == "ifupdown")
    assert ifupdown.interfaces == ["eth0"] and ifupdown.addresses == ["192.168.50.10/24"]
    bindings = [b for n in insp.network for b in n.mac_bindings]
    assert len(bindings) == 2 and all("00:50:56:aa:bb:01" in b for b in bindings)


def test_windows_phony_inspection_and_refusal_without_virtio_win(
    windows_phony_image: Path,
) -> None:
    insp = inspect_image(windows_phony_image)
    assert (insp.os_type, insp.distro, insp.family) == ("windows", "windows", "windows")
    assert (insp.major, insp.minor, insp.arch) == (10, 0, "x86_64")
    assert insp.product_name == "Windows Server 2022 Standard (Ferryman phony)"
    assert insp.hostname == "winphony" and insp.bootloader == "windows"
    assert insp.windows is not None
    assert insp.windows.control_set == "ControlSet001"
    assert insp.windows.virtio_services == [] and insp.windows.vmware_services == ["vmci"]
    assert insp.hypervisor_tools == ["VMwareTools (vmware)"]
    assert not insp.windows.dynamic_disks

    v = preflight(insp)
    assert v.backend == "virt-v2v" and not v.ok
    (b,) = v.blockers
    assert b.code == "windows_needs_virtio_win"
    assert b.message == (
        "winphony: cannot convert Windows: missing virtio-win (not configured); "
        "rhsrvany.exe and pnp_wait.exe"
    )
    for needed in ("virtio-win", "viostor", "vioscsi", "NetKVM", "rhsrvany.exe", "pnp_wait.exe"):
        assert needed in b.fix


def test_windows_refusal_through_convert(windows_phony_image: Path, tmp_path: Path) -> None:
    from appliance.convert.api import convert

    ov = tmp_path / "win.qcow2"
    with pytest.raises(PreflightRefused) as e:
        convert(windows_phony_image, ov, backend="virt-v2v")
    assert "missing virtio-win (not configured)" in str(e.value)
    assert e.value.blockers and not ov.exists()  # the half-made overlay is removed


def _host_mounts() -> set[str]:
    with open("/proc/mounts") as f:
        return set(f.read().splitlines())


GUEST_FS = ("ext2", "ext3", "ext4", "xfs", "btrfs", "ntfs", "ntfs3", "vfat", "fuse", "fuseblk")


@pytest.mark.reliability
def test_damaged_disk_clear_error_in_time_nothing_mounted(
    vmware_like_image: Path, overlay_factory: Callable[[Path, str], Path]
) -> None:
    """Row 21: random bytes over the partition table and the superblock."""
    ov = overlay_factory(vmware_like_image, "damaged")
    junk = ov.with_name("junk.bin")
    junk.write_bytes(os.urandom(2 * 1024 * 1024))
    # Random bytes over the MBR and the start of the partition (ext4 superblock at +1 KiB).
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -s {junk} 0 2M", str(ov)],
        check=True,
        capture_output=True,
    )
    before = _host_mounts()
    t0 = time.monotonic()
    with pytest.raises(DamagedDisk) as e:
        inspect_image(ov, timeout=180)
    took = time.monotonic() - t0
    assert took < 180
    assert str(ov) in str(e.value) and "earlier restore point" in str(e.value)
    assert e.value.code == "convert.damaged_disk"
    # Other processes may mount things meanwhile (network namespaces): look for ours only.
    new = _host_mounts() - before
    ours = [m for m in new if str(ov.parent) in m or m.split()[2] in GUEST_FS]
    assert ours == []
    loops = subprocess.run(["losetup", "-j", str(ov)], capture_output=True, text=True).stdout
    assert loops == ""
