"""Conversion proven by booting: real libguestfs, real qemu under TCG, one guest at a time.

Slow (a conversion is 1-3 min under TCG, a boot ~35-50 s): marked slow + integration. The
images come from tests/images_fixtures.py and are shared by the whole session.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.convert.api import ConvertResult, convert
from appliance.convert.boot import boot

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.e2e,
    pytest.mark.timeout(1800),
]
BOOT_TIMEOUT = 300.0  # seconds; a converted guest reaches its marker in ~35-60 s under TCG


def test_negative_control_vmware_like_does_not_boot_on_virtio(
    vmware_like_image: Path, tmp_path: Path
) -> None:
    r = boot(vmware_like_image, console=tmp_path / "console.log", disk_bus="virtio", timeout=240)
    assert not r.booted
    assert "Gave up waiting for root" in r.reason or r.reason.startswith("timeout")


def test_builtin_converter_boots_vmware_like_on_virtio(
    converted_vmware_like: tuple[ConvertResult, Path], tmp_path: Path
) -> None:
    result, overlay = converted_vmware_like
    assert result.backend == "builtin"
    assert result.verify["ok"], result.verify["problems"]
    assert any("open-vm-tools" in c for c in result.changes)
    assert any("fstab: /dev/sda1 -> UUID=" in c for c in result.changes)
    r = boot(
        overlay,
        console=tmp_path / "console.log",
        disk_bus="virtio",
        nic_model="virtio-net-pci",
        timeout=BOOT_TIMEOUT,
    )
    assert r.booted, f"{r.reason}; console in {r.console}"
    assert r.fields["root"] == "/dev/vda1"
    assert "virtio_blk" in r.fields["block"].split(",")
    assert r.fields["net"].endswith(":virtio_net")
    console = Path(r.console).read_text(errors="replace")
    assert "root=UUID=5e1f2a3b-0c4d-4e5f-8a9b-000000000001" in console  # kernel command line


def test_virt_v2v_in_place_boots_vmware_like_on_virtio(
    vmware_like_image: Path, tmp_path: Path
) -> None:
    overlay = tmp_path / "vmware-like-v2v.qcow2"
    result = convert(vmware_like_image, overlay, backend="virt-v2v", log_dir=tmp_path)
    assert result.backend == "virt-v2v" and result.log is not None
    assert Path(result.log).stat().st_size > 0
    r = boot(overlay, console=tmp_path / "console.log", disk_bus="virtio", timeout=BOOT_TIMEOUT)
    assert r.booted, f"{r.reason}; console in {r.console}"
    assert r.fields["root"] == "/dev/vda1"
    assert "virtio_blk" in r.fields["block"].split(",")


def test_plan_static_address_on_lvm_guest_with_guest_tool_initramfs(
    lvm_static_image: Path, tmp_path: Path
) -> None:
    """LVM root + separate /boot, update-initramfs run by the guest itself, and the static
    address of the plan (not the image's 192.168.50.10) is what the booted guest reports."""
    overlay = tmp_path / "lvm-static.qcow2"
    plan = {
        "hostname": "db01",
        "interfaces": [
            {
                "name": "eth0",
                "ipv4": ["10.0.2.77/24"],
                "gateway4": "10.0.2.2",
                "ipv6": ["fd00:f:e::77/64"],
                "dns": ["10.0.2.3"],
            }
        ],
    }
    result = convert(lvm_static_image, overlay, plan=plan, initramfs="guest-tool")
    assert result.verify["ok"], result.verify["problems"]
    assert any("update-initramfs" in c or "rebuild the initramfs" in c for c in result.changes)
    assert any("MAC binding" in c or "70-persistent-net" in c for c in result.changes)
    r = boot(
        overlay,
        console=tmp_path / "console.log",
        disk_bus="virtio",
        mac="52:54:00:fe:00:77",
        timeout=BOOT_TIMEOUT,
    )
    assert r.booted, f"{r.reason}; console in {r.console}"
    assert r.fields["root"] == "/dev/mapper/vg0-root"
    assert r.fields["disks"] == "vda"
    assert r.fields["ip"] == "eth0:10.0.2.77/24"
    assert "eth0:fd00:f:e::77/64" in r.fields["ip6"]
    assert r.fields["host"] == "db01"


def test_windows_phony_virt_v2v_writes_drivers_and_registry(
    windows_phony_image: Path,
    virtio_win_tree: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    import guestfs
    import hivex

    virtio_win, tools = virtio_win_tree
    overlay = tmp_path / "win.qcow2"
    try:
        result = convert(
            windows_phony_image,
            overlay,
            virtio_win=virtio_win,
            virt_tools_dir=tools,
            log_dir=tmp_path,
        )
    finally:
        log = tmp_path / "win.qcow2.virt-v2v.log"
        if log.exists():
            print(log.read_text(errors="replace")[-3000:])
    # No backend asked: inspection found Windows and chose virt-v2v.
    assert result.backend == "virt-v2v"
    assert result.verify["ok"], result.verify["problems"]
    g = guestfs.GuestFS(python_return_dict=True)
    g.add_drive_opts(str(overlay), format="qcow2", readonly=True)
    g.launch()
    try:
        g.mount_ro("/dev/sda2", "/")
        drivers = [p.lstrip("/") for p in g.find("/Windows/Drivers/VirtIO")]
        assert "viostor.sys" in drivers and "netkvm.sys" in drivers
        # NTFS through ntfs-3g is case-sensitive; Windows paths are not.
        assert g.exists(g.case_sensitive_path("/Windows/System32/drivers/viostor.sys"))
        g.download(
            g.case_sensitive_path("/Windows/System32/config/SYSTEM"), str(tmp_path / "SYSTEM")
        )
    finally:
        g.close()
    h = hivex.Hivex(str(tmp_path / "SYSTEM"))
    services = h.node_get_child(h.node_get_child(h.root(), "ControlSet001"), "Services")
    viostor = h.node_get_child(services, "viostor")
    assert viostor, "no viostor service in the SYSTEM hive"
    values = {h.value_key(v): v for v in h.node_values(viostor)}
    assert "ImagePath" in values and "viostor" in h.value_string(values["ImagePath"]).lower()
    assert h.value_dword(values["Start"]) == 0  # boot start: the disk driver loads at boot
