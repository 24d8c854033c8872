"""The vSphere source's pure parts: fingerprints, policies, endpoints, secrets, extents,
device parsing and the VDDK command line. No server needed; runs in milliseconds."""

from __future__ import annotations

import pickle
import stat
from pathlib import Path

import pytest
from pyVmomi import vim

from appliance.sources.base import DiskInfo
from appliance.sources.vsphere import Endpoint, Secret, TlsPolicy
from appliance.sources.vsphere.inventory import disks_of, guest_ips
from appliance.sources.vsphere.protect import disk_blockers
from appliance.sources.vsphere.reader import NbdkitExport, folder_url, vddk_available, vddk_export
from appliance.sources.vsphere.source import VSphereDiskExport, _merge
from appliance.sources.vsphere.tls import normalize_fingerprint

FP = "AB:" * 31 + "CD"


def test_fingerprints_are_normalized_and_checked() -> None:
    assert normalize_fingerprint(FP.lower()) == FP
    assert normalize_fingerprint(FP.replace(":", "")) == FP
    assert normalize_fingerprint(FP.replace(":", " ")) == FP
    with pytest.raises(ValueError, match="64 hex digits"):
        normalize_fingerprint("AB:CD")
    with pytest.raises(ValueError):
        TlsPolicy(mode="pinned")
    with pytest.raises(ValueError):
        TlsPolicy(mode="trust-me")  # type: ignore[arg-type]
    p = TlsPolicy.pinned(FP.lower())
    assert TlsPolicy.from_dict(p.to_dict()) == p and p.sha256 == FP


def test_endpoint_never_holds_a_password() -> None:
    ep = Endpoint.from_url("https://vc01.example.com:8443/sdk", "svc@vsphere.local")
    assert (ep.host, ep.port, ep.tls.mode) == ("vc01.example.com", 8443, "ca")
    assert Endpoint.from_dict(ep.to_dict()) == ep
    assert Endpoint.from_url("10.0.0.5", "root").port == 443
    with pytest.raises(ValueError, match="credential store"):
        Endpoint.from_url("https://root:secret@esx01", "root")
    with pytest.raises(ValueError):
        Endpoint.from_url("http://vc01", "root")


def test_endpoint_from_a_store_record() -> None:
    pinned = Endpoint.from_record("https://esx01", "root", thumbprint=FP.lower())
    assert pinned.tls == TlsPolicy.pinned(FP) and pinned.port == 443
    assert Endpoint.from_record("https://esx01", "root", insecure=True).tls.mode == "insecure"
    ca = Endpoint.from_record("https://vc:8443", "svc", cafile="/etc/ferryman/ca.pem")
    assert (ca.tls.mode, ca.tls.cafile, ca.port) == ("ca", "/etc/ferryman/ca.pem", 8443)


def test_secret_masks_itself() -> None:
    s = Secret("hunter2-canary")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in f"{s}"
    assert s.reveal() == "hunter2-canary"
    with pytest.raises(TypeError):
        pickle.dumps(s)


def _export(mode: str, areas: list[tuple[int, int]], size: int) -> VSphereDiskExport:
    return VSphereDiskExport(
        disk=DiskInfo(key="2000", size=size),
        nbd_uri="nbd+unix:///?socket=/nonexistent",
        mode=mode,
        areas=areas,
        export=NbdkitExport(label="x", argv=[], workdir=Path("/nonexistent"), size=size),
    )


def test_full_extents_cover_the_disk_with_zero_holes_dirty_only_changes() -> None:
    size = 100
    full = list(_export("full", [(10, 20), (50, 10)], size).extents())
    assert [(e.offset, e.length, e.zero) for e in full] == [
        (0, 10, True),
        (10, 20, False),
        (30, 20, True),
        (50, 10, False),
        (60, 40, True),
    ]
    assert sum(e.length for e in full) == size
    dirty = list(_export("dirty", [(10, 20), (50, 10)], size).extents())
    assert [(e.offset, e.length, e.zero) for e in dirty] == [(10, 20, False), (50, 10, False)]


def test_changed_areas_are_merged_sorted_and_clipped() -> None:
    assert _merge([(50, 10), (0, 10), (10, 5), (55, 20), (95, 50)], 100) == [
        (0, 15),
        (50, 25),
        (95, 5),
    ]


def test_device_parsing_flags_rdm_independent_and_sizes() -> None:
    dev = vim.vm.device
    flat = dev.VirtualDisk(
        key=2000,
        controllerKey=1000,
        capacityInKB=1024,
        backing=dev.VirtualDisk.FlatVer2BackingInfo(
            fileName="[ds1] web/web.vmdk", diskMode="independent_persistent", changeId="52 a/3"
        ),
    )
    rdm = dev.VirtualDisk(
        key=2001,
        controllerKey=1000,
        capacityInBytes=5 << 30,
        backing=dev.VirtualDisk.RawDiskMappingVer1BackingInfo(
            fileName="[ds1] web/web_1.vmdk", compatibilityMode="physicalMode", diskMode=""
        ),
    )
    ctl = dev.ParaVirtualSCSIController(key=1000, busNumber=0)
    a, b = disks_of([ctl, flat, rdm])
    assert (a.size, a.independent, a.backing, a.change_id) == (1 << 20, True, "flat", "52 a/3")
    assert a.flat_path == "web/web-flat.vmdk" and a.datastore == "ds1"
    assert a.controller == "ParaVirtualSCSIController 0"
    assert (b.size, b.backing) == (5 << 30, "rdm-physical")
    # vcsim 0.24.2 panics on RDM backings, so the refusal is proven here on pyVmomi objects.
    ra, rb = disk_blockers([a, b])
    assert "disk 2000" in ra and "independent_persistent" in ra
    assert "disk 2001" in rb and "physical-mode RDM" in rb
    ok = dev.VirtualDisk(
        key=2002,
        capacityInKB=1,
        backing=dev.VirtualDisk.FlatVer2BackingInfo(fileName="[ds1] a.vmdk", diskMode="persistent"),
    )
    assert disk_blockers(disks_of([ok])) == []


def test_folder_url_quotes_paths_and_names() -> None:
    u = folder_url("vc01", 443, "Site A/DC 1", "ds #1", "my vm/my vm-flat.vmdk")
    assert u == (
        "https://vc01/folder/my%20vm/my%20vm-flat.vmdk?dcPath=Site+A%2FDC+1&dsName=ds+%231"
    )
    assert folder_url("::1", 8443, "DC0", "ds", "a-flat.vmdk").startswith("https://[::1]:8443/")


def test_vddk_command_line_carries_no_password(tmp_path: Path) -> None:
    e = vddk_export(
        label="vm-42-2000",
        libdir="/opt/vmware-vix-disklib-distrib",
        server="vc01",
        user="svc@vsphere.local",
        password=Secret("canary-vddk"),
        thumbprint="AA:" * 19 + "BB",
        vm_moref="vm-42",
        snapshot_moref="snapshot-7",
        file="[ds1] web/web.vmdk",
        size=1 << 30,
        run_dir=tmp_path,
    )
    try:
        assert not any("canary-vddk" in a for a in e.argv)
        (pw,) = e.secrets
        assert f"password=+{pw}" in e.argv and "vm=moref=vm-42" in e.argv
        assert pw.read_text() == "canary-vddk"
        assert stat.S_IMODE(pw.stat().st_mode) == 0o600
        assert stat.S_IMODE(e.workdir.stat().st_mode) == 0o700
    finally:
        e.close()
    assert not e.workdir.exists()


def test_vddk_reader_refused_with_the_reason_when_vddk_is_missing(tmp_path: Path) -> None:
    from appliance.sources.vsphere import VSphereError, VSphereSource

    assert not vddk_available(str(tmp_path))
    src = VSphereSource(
        Endpoint.from_url("vc01.invalid", "svc"), Secret("x"), vddk_libdir=str(tmp_path)
    )
    with pytest.raises(VSphereError, match="VDDK reader configured but not usable"):
        src.open_session("vm-1", None)  # refused before any connection or snapshot


def test_guest_addresses_by_mac() -> None:
    net = [
        vim.vm.GuestInfo.NicInfo(
            macAddress="00:50:56:aa:bb:cc",
            ipConfig=vim.net.IpConfigInfo(
                ipAddress=[
                    vim.net.IpConfigInfo.IpAddress(ipAddress="10.0.0.5", prefixLength=24),
                    vim.net.IpConfigInfo.IpAddress(ipAddress="fe80::1", prefixLength=64),
                ]
            ),
        ),
        vim.vm.GuestInfo.NicInfo(macAddress="00:50:56:aa:bb:cd", ipAddress=["192.168.1.9"]),
        vim.vm.GuestInfo.NicInfo(macAddress="00:50:56:aa:bb:ce"),
    ]
    assert guest_ips(net) == {
        "00:50:56:aa:bb:cc": ["10.0.0.5", "fe80::1"],
        "00:50:56:aa:bb:cd": ["192.168.1.9"],
    }
    assert guest_ips(None) == {}
