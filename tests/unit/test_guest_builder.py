"""images/guests/builder.py: the host-made disk, recipe keys, and the host's device nodes.

The disk is checked with the host's own tools (partx, blkid, debugfs), not with the builder's
code: the partition table is what fdisk would have written, the file system holds the tree with
owners, modes and links intact. Booting it is the demo test's and the conversion tests' job.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
MIB = 1024**2


@pytest.fixture(scope="module")
def builder() -> ModuleType:
    from tests.images_fixtures import _builder

    return _builder()


def _tree(root: Path) -> Path:
    tree = root / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "tmp").mkdir()
    (tree / "tmp").chmod(0o1777)
    (tree / "etc" / "hostname").write_text("web01\n")
    su = tree / "usr" / "bin" / "su"
    su.write_bytes(b"\x7fELF" + b"\0" * 4096)
    su.chmod(0o4755)
    shadow = tree / "etc" / "shadow"
    shadow.write_text("root:*:1::::::\n")
    os.chown(shadow, 0, 42)
    shadow.chmod(0o640)
    (tree / "etc" / "hostname.link").symlink_to("hostname")
    os.link(tree / "etc" / "hostname", tree / "etc" / "hostname.hard")
    return tree


def _debugfs(disk: Path, request: str) -> str:
    r = subprocess.run(
        ["debugfs", "-R", request, f"{disk}?offset={MIB}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout


def test_host_disk_is_an_mbr_disk_with_the_tree_in_ext4(
    builder: ModuleType, tmp_path: Path
) -> None:
    raw = tmp_path / "disk.raw"
    uuid = "5e1f2a3b-0c4d-4e5f-8a9b-0000000000aa"
    size = 64 * MIB
    builder._host_disk(raw, _tree(tmp_path), uuid, size, tmp_path / "log")

    assert raw.stat().st_size == size
    mbr = raw.read_bytes()[:512]
    assert mbr[510:] == b"\x55\xaa" and mbr[0x1BE] == 0x80  # valid, partition 1 bootable
    parts = subprocess.run(
        ["partx", "-g", "-r", "-o", "NR,START,SECTORS,TYPE", str(raw)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert parts == ["1", "2048", str(size // 512 - 2048), "0x83"]
    pt = subprocess.run(
        ["blkid", "-p", "-o", "export", str(raw)], capture_output=True, text=True, check=True
    ).stdout
    assert "PTTYPE=dos" in pt and "PTUUID=000000aa" in pt
    fs = subprocess.run(
        ["blkid", "-p", "-o", "export", "-O", str(MIB), str(raw)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "TYPE=ext4" in fs and f"UUID={uuid}" in fs and "LABEL=root" in fs

    su = _debugfs(raw, "stat /usr/bin/su")
    assert "Mode:  04755" in su and "User:     0" in su and "Size: 4100" in su
    shadow = _debugfs(raw, "stat /etc/shadow")
    assert "Mode:  0640" in shadow and "Group:    42" in shadow
    assert "Mode:  01777" in _debugfs(raw, "stat /tmp")
    assert "Links: 2" in _debugfs(raw, "stat /etc/hostname")
    assert 'Fast link dest: "hostname"' in _debugfs(raw, "stat /etc/hostname.link")
    assert _debugfs(raw, "cat /etc/hostname") == "web01\n"
    fsck = subprocess.run(["e2fsck", "-fn", f"{raw}?offset={MIB}"], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_lab_guest_key_follows_its_base_recipe(
    builder: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "guests"
    shutil.copytree(ROOT / "images" / "guests", here, symlinks=True)
    monkeypatch.setattr(builder, "HERE", here)
    before = {n: builder.recipe_key(n) for n in ("vmware-like", "lab-web01", "lvm-static")}
    assert builder._recipes("lab-web01") == ["vmware-like", "lab-web01"]

    with (here / "vmware-like" / "customize.sh").open("a") as f:
        f.write("# changed\n")
    after = {n: builder.recipe_key(n) for n in before}
    assert after["vmware-like"] != before["vmware-like"]
    assert after["lab-web01"] != before["lab-web01"]
    assert after["lvm-static"] == before["lvm-static"]

    (here / "lab-web01" / "overlay" / "usr" / "local" / "sbin" / "ferryman-lab-writer").write_text(
        "#!/bin/sh\n"
    )
    assert builder.recipe_key("lab-web01") != after["lab-web01"]
    assert builder.recipe_key("vmware-like") == after["vmware-like"]


def test_device_nodes_restored_and_kvm_given_to_group_kvm(
    builder: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kvm, tun = tmp_path / "kvm", tmp_path / "tun"
    for node in (kvm, tun):
        node.write_text("")
        os.chown(node, 0, 103)
        node.chmod(0o660)
    monkeypatch.setattr(builder, "KVM_NODE", str(kvm))
    monkeypatch.setattr(builder, "HOST_NODES", (str(kvm), str(tun)))
    monkeypatch.setattr(builder, "_kvm_gid", lambda: 4242)
    with builder.host_devices_kept():  # a chroot's package script moved both
        os.chown(kvm, 0, 999)
        os.chown(tun, 0, 999)
        tun.chmod(0o666)
    assert (kvm.stat().st_gid, kvm.stat().st_mode & 0o777) == (4242, 0o660)
    assert (tun.stat().st_gid, tun.stat().st_mode & 0o777) == (103, 0o660)

    # set-up gives /dev/kvm to kvm while a build runs beside it: the build must not undo it
    os.chown(kvm, 0, 103)
    with builder.host_devices_kept():
        os.chown(kvm, 0, 4242)
    assert kvm.stat().st_gid == 4242
