"""The boot harness without booting: command lines, marker parsing, failure detection."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from appliance.convert import api
from appliance.convert.boot import boot, parse_marker, qemu_command
from appliance.convert.errors import BootError


def test_marker_fields() -> None:
    f = parse_marker("root=/dev/vda1 disks=vda block=virtio_blk net=ens3:virtio_net ip= host=x")
    assert f == {
        "root": "/dev/vda1",
        "disks": "vda",
        "block": "virtio_blk",
        "net": "ens3:virtio_net",
        "ip": "",
        "host": "x",
    }


@pytest.mark.parametrize(
    ("bus", "device"),
    [
        ("virtio", "virtio-blk-pci,drive=disk0,bootindex=0"),
        ("sata", "ide-hd,drive=disk0,bus=ahci0.0,bootindex=0"),
        ("scsi", "scsi-hd,drive=disk0,bus=scsi0.0,bootindex=0"),
    ],
)
def test_qemu_command_bus_nic_snapshot(tmp_path: Path, bus: str, device: str) -> None:
    cmd = qemu_command(
        tmp_path / "d.qcow2",
        console=tmp_path / "c.log",
        disk_bus=bus,  # type: ignore[arg-type]
        nic_model="e1000",
        mac="52:54:00:00:00:09",
    )
    assert device in cmd
    assert "e1000,netdev=net0,mac=52:54:00:00:00:09" in cmd
    assert "-snapshot" in cmd  # a boot never writes the image it proves
    assert "pc,accel=tcg" in cmd
    assert f"file,id=ser0,path={tmp_path / 'c.log'}" in cmd


def test_unknown_bus_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BootError, match="unknown disk bus"):
        qemu_command(tmp_path / "d", console=tmp_path / "c", disk_bus="floppy")  # type: ignore[arg-type]


def test_qemu_that_cannot_open_the_image_is_reported_not_hung(tmp_path: Path) -> None:
    r = boot(tmp_path / "missing.qcow2", console=tmp_path / "c.log", timeout=30)
    assert not r.booted and r.reason.startswith("qemu exited")
    assert r.seconds < 30


def test_cancel_stops_the_wait(tmp_path: Path) -> None:
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"\0" * 1024 * 1024)
    cancel = threading.Event()
    threading.Timer(2.0, cancel.set).start()
    # A blank disk: SeaBIOS finds nothing to boot and qemu runs on until stopped.
    r = boot(empty, console=tmp_path / "c.log", timeout=60, cancel=cancel, image_format="raw")
    assert r.reason == "cancelled" and not r.booted
    assert r.seconds < 10


def test_parallel_limit_bounded_by_cores_and_memory() -> None:
    gib = 1024**3
    assert api.parallel_limit(cpus=8, mem_available=3 * gib) == 2  # memory bound (1.5 GiB each)
    assert api.parallel_limit(cpus=2, mem_available=64 * gib) == 2  # core bound
    assert api.parallel_limit(cpus=4, mem_available=1 * gib) == 1  # at least one


def test_create_overlay_refuses_existing_and_missing(tmp_path: Path) -> None:
    from appliance.convert.errors import ConvertError

    with pytest.raises(ConvertError, match="does not exist"):
        api.create_overlay(tmp_path / "rp.qcow2", tmp_path / "ov.qcow2")
    (tmp_path / "ov.qcow2").write_bytes(b"")
    with pytest.raises(ConvertError, match="already exists"):
        api.create_overlay(tmp_path / "rp.qcow2", tmp_path / "ov.qcow2")
