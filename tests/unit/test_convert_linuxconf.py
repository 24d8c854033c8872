"""The converter's text decisions on real file trees, for every family (no libguestfs).

RHEL and SUSE guests cannot be booted on the build machines; these tests are how their paths
are checked: dracut configuration and command, grub2-mkconfig target, BLS entries, ifcfg.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.convert import customise, linux, linuxconf
from appliance.convert.errors import PlanError
from appliance.convert.files import DirFiles
from appliance.convert.inspect import FilesystemInfo, Inspection, KernelInfo
from appliance.convert.preflight import preflight


def tree(tmp_path: Path, files: dict[str, str]) -> DirFiles:
    for path, text in files.items():
        p = tmp_path / path.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return DirFiles(tmp_path)


def inspection(family: str, **kw: object) -> Inspection:
    base: dict[str, object] = dict(
        image="/x.qcow2",
        os_type="linux",
        distro={"debian": "debian", "rhel": "rhel", "suse": "sles"}[family],
        family=family,
        product_name="",
        major=9,
        minor=0,
        arch="x86_64",
        hostname="web01",
        package_format="deb" if family == "debian" else "rpm",
        root_device="/dev/sda2",
        mountpoints={"/": "/dev/sda2", "/boot": "/dev/sda1"},
        firmware="bios",
        bootloader="grub2",
        grub_cfg="/boot/grub/grub.cfg" if family == "debian" else "/boot/grub2/grub.cfg",
        kernel_cmdline="root=/dev/sda2 ro quiet",
        kernels=[
            KernelInfo(
                "5.14.0-1",
                "/boot/vmlinuz-5.14.0-1",
                None,
                ["virtio_blk", "virtio_pci"],
                [],
                True,
            )
        ],
        fstab=[],
        network=[],
        hypervisor_tools=["open-vm-tools (vmware)"],
        filesystems=[
            FilesystemInfo("/dev/sda1", "xfs", uuid="1111-boot"),
            FilesystemInfo("/dev/sda2", "xfs", uuid="2222-root"),
            FilesystemInfo("/dev/sda3", "swap", uuid="3333-swap"),
        ],
        luks=[],
        luks_locked=[],
        lvm=False,
        dynamic_disks=False,
        windows=None,
        free_root=10 * 1024**3,
        free_boot=500 * 1024**2,
    )
    base.update(kw)
    return Inspection(**base)  # type: ignore[arg-type]


FSTAB = """# static file system information
/dev/sda2  /      xfs   defaults  0 1
/dev/sda1  /boot  xfs   defaults  0 2
/dev/sda3  none   swap  sw        0 0
LABEL=data /data  ext4  defaults  0 2
"""


def test_fstab_device_names_become_uuids() -> None:
    text, changes = linuxconf.rewrite_fstab(
        FSTAB, {"/dev/sda1": "1111-boot", "/dev/sda2": "2222-root", "/dev/sda3": "3333-swap"}
    )
    assert "UUID=2222-root  /      xfs" in text
    assert "UUID=1111-boot  /boot" in text
    assert "UUID=3333-swap  none   swap" in text
    assert "LABEL=data /data" in text  # untouched
    assert "# static file system information" in text
    assert len(changes) == 3


def test_rhel_tree_dracut_grub2_bls_and_ifcfg(tmp_path: Path) -> None:
    files = tree(
        tmp_path,
        {
            "/etc/fstab": FSTAB,
            "/etc/default/grub": (
                'GRUB_TIMEOUT=5\nGRUB_CMDLINE_LINUX="resume=/dev/sda3 rhgb quiet"\n'
            ),
            "/boot/loader/entries/abc-5.14.0-1.conf": (
                "title RHEL\nversion 5.14.0-1\nlinux /vmlinuz-5.14.0-1\n"
                "options root=/dev/sda2 ro resume=/dev/sda3\n"
            ),
            "/etc/sysconfig/network-scripts/ifcfg-eth0": (
                'DEVICE=eth0\nBOOTPROTO=none\nHWADDR="00:50:56:01:02:03"\nIPADDR=10.1.1.5\n'
                "PREFIX=24\nONBOOT=yes\n"
            ),
            "/usr/sbin/grub2-mkconfig": "",
        },
    )
    insp = inspection("rhel")
    insp.network = linuxconf.network_configs(files)
    changes = linux.edit_configuration(files, insp)

    fstab = files.read("/etc/fstab")
    assert "/dev/sda" not in fstab
    grub = files.read("/etc/default/grub")
    assert "resume=UUID=3333-swap" in grub
    assert "console=ttyS0,115200n8" in grub
    bls = files.read("/boot/loader/entries/abc-5.14.0-1.conf")
    assert "options root=UUID=2222-root ro resume=UUID=3333-swap" in bls
    assert "console=ttyS0" in bls
    ifcfg = files.read("/etc/sysconfig/network-scripts/ifcfg-eth0")
    assert "HWADDR" not in ifcfg and "IPADDR=10.1.1.5" in ifcfg
    # eth0 names and a dropped MAC binding: kernel naming keeps eth0 on the new NIC.
    assert "net.ifnames=0" in grub
    assert any("MAC binding" in c for c in changes)

    kernel = insp.kernels[0]
    changes_initrd, cmds = linux.configure_initramfs(files, insp, kernel)
    assert changes_initrd
    conf = files.read("/etc/dracut.conf.d/90-ferryman-virtio.conf")
    assert 'add_drivers+=" virtio_pci virtio_blk virtio_scsi "' in conf
    assert cmds[0].argv == [
        "dracut",
        "--force",
        "--no-hostonly-cmdline",
        "/boot/initramfs-5.14.0-1.img",
        "5.14.0-1",
    ]
    assert linux.grub_commands(files, insp)[0].argv == [
        "grub2-mkconfig",
        "-o",
        "/boot/grub2/grub.cfg",
    ]
    assert linux.remove_tools_command(insp) is not None
    assert linux.remove_tools_command(insp).argv == ["rpm", "-e", "--nodeps", "open-vm-tools"]  # type: ignore[union-attr]


def test_suse_tree_dracut_initrd_name_and_ifcfg_customisation(tmp_path: Path) -> None:
    files = tree(
        tmp_path,
        {
            "/etc/default/grub": 'GRUB_CMDLINE_LINUX_DEFAULT="splash=silent"\n',
            "/etc/sysconfig/network/ifcfg-eth0": "BOOTPROTO='dhcp'\nSTARTMODE='auto'\n",
            "/etc/hosts": "127.0.0.1 localhost\n",
        },
    )
    insp = inspection("suse")
    _, cmds = linux.configure_initramfs(files, insp, insp.kernels[0])
    assert cmds[0].argv[3] == "/boot/initrd-5.14.0-1"
    c = customise.Customisation.from_plan(
        {
            "hostname": "db01.example.org",
            "interfaces": [
                {
                    "name": "eth0",
                    "ipv4": ["10.2.0.7/24"],
                    "gateway4": "10.2.0.1",
                    "dns": ["10.2.0.53"],
                }
            ],
        }
    )
    changes = customise.apply(files, "suse", c)
    ifcfg = files.read("/etc/sysconfig/network/ifcfg-eth0")
    assert "IPADDR=10.2.0.7" in ifcfg and "PREFIX=24" in ifcfg
    assert "STARTMODE=auto" in ifcfg and "BOOTPROTO=static" in ifcfg
    assert files.read("/etc/HOSTNAME") == "db01.example.org\n"
    assert "127.0.1.1\tdb01.example.org db01" in files.read("/etc/hosts")
    assert len(changes) == 2


def test_debian_ifupdown_plan_replaces_only_named_stanzas(tmp_path: Path) -> None:
    files = tree(
        tmp_path,
        {
            "/etc/network/interfaces": (
                "source /etc/network/interfaces.d/*\n\nauto lo\niface lo inet loopback\n\n"
                "auto eth0\niface eth0 inet static\n    address 192.168.50.10/24\n"
                "    gateway 192.168.50.1\n    hwaddress ether 00:50:56:aa:bb:01\n\n"
                "auto eth1\niface eth1 inet dhcp\n"
            ),
            "/sbin/ifup": "",
        },
    )
    c = customise.Customisation.from_plan(
        {
            "interfaces": [
                {
                    "name": "eth0",
                    "mac": "52:54:00:12:34:56",
                    "ipv4": ["10.0.2.77/24"],
                    "gateway4": "10.0.2.2",
                    "ipv6": ["fd00::77/64"],
                    "gateway6": "fd00::1",
                    "dns": ["10.0.2.3"],
                }
            ]
        }
    )
    customise.apply(files, "debian", c)
    text = files.read("/etc/network/interfaces")
    assert "192.168.50.10" not in text and "hwaddress" not in text
    assert "iface eth1 inet dhcp" in text and "iface lo inet loopback" in text
    assert "iface eth0 inet static\n    address 10.0.2.77/24\n    gateway 10.0.2.2" in text
    assert "iface eth0 inet6 static\n    address fd00::77/64\n    gateway fd00::1" in text
    link = files.read("/etc/systemd/network/10-ferryman-eth0.link")
    assert "MACAddress=52:54:00:12:34:56" in link and "Name=eth0" in link
    assert files.read("/etc/resolv.conf") == "nameserver 10.0.2.3\n"


def test_netplan_and_networkmanager_mac_bindings_dropped(tmp_path: Path) -> None:
    files = tree(
        tmp_path,
        {
            "/etc/netplan/50-cloud-init.yaml": (
                "network:\n  version: 2\n  ethernets:\n    ens192:\n      match:\n"
                "        macaddress: 00:50:56:aa:bb:cc\n      set-name: ens192\n"
                "      dhcp4: true\n"
            ),
            "/etc/NetworkManager/system-connections/Wired.nmconnection": (
                "[connection]\nid=Wired\ntype=ethernet\ninterface-name=ens192\n\n[ethernet]\n"
                "mac-address=00:50:56:AA:BB:CC\n\n[ipv4]\nmethod=auto\n"
            ),
            "/etc/udev/rules.d/70-persistent-net.rules": (
                'SUBSYSTEM=="net", ATTR{address}=="00:50:56:aa:bb:cc", NAME="ens192"\n'
            ),
        },
    )
    before = linuxconf.network_configs(files)
    assert sum(len(c.mac_bindings) for c in before) == 3
    linuxconf.drop_mac_bindings(files)
    after = linuxconf.network_configs(files)
    assert sum(len(c.mac_bindings) for c in after) == 0
    assert not files.exists("/etc/udev/rules.d/70-persistent-net.rules")
    netplan = files.read("/etc/netplan/50-cloud-init.yaml")
    assert "dhcp4: true" in netplan and "ens192:" in netplan and "match" not in netplan


def test_plan_renderers_netplan_nm_keyfile() -> None:
    i = linuxconf.InterfacePlan(
        name="lan0",
        mac="52:54:00:00:00:01",
        ipv4=["10.0.0.5/24"],
        gateway4="10.0.0.1",
        ipv6=["fd00::5/64"],
        dns=["10.0.0.53", "fd00::53"],
    )
    np = linuxconf.render_netplan([i])
    assert '- "10.0.0.5/24"' in np and 'via: "10.0.0.1"' in np and "macaddress: 52:54" in np
    nm = linuxconf.render_nm_keyfile(i)
    assert "address1=10.0.0.5/24,10.0.0.1" in nm
    assert "dns=10.0.0.53;" in nm and "dns=fd00::53;" in nm
    assert "interface-name=lan0" in nm


@pytest.mark.parametrize(
    ("plan", "path"),
    [
        ({"hostname": "bad_name!"}, "$.hostname"),
        ({"interfaces": [{"name": "eth0", "ipv4": ["10.0.0.5"]}]}, "$.interfaces[0]"),
        ({"interfaces": [{"ipv4": []}]}, "$.interfaces[0].name"),
        ({"interfaces": [{"name": "e", "mac": "zz"}]}, "$.interfaces[0].mac"),
        ({"ssh_authorized_keys": {"root": ["not a key"]}}, "$.ssh_authorized_keys.root[0]"),
        ({"hostnme": "x"}, "unknown keys hostnme"),
    ],
)
def test_plan_errors_name_the_json_path(plan: dict[str, object], path: str) -> None:
    with pytest.raises(PlanError) as e:
        customise.Customisation.from_plan(plan)
    assert path in str(e.value)


def test_ssh_keys_go_to_the_users_home_with_modes(tmp_path: Path) -> None:
    files = tree(
        tmp_path,
        {"/etc/passwd": "root:x:0:0:root:/root:/bin/bash\nops:x:1000:1000::/home/ops:/bin/sh\n"},
    )
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBz ops@site"
    c = customise.Customisation.from_plan({"ssh_authorized_keys": {"ops": [key]}})
    customise.apply(files, "debian", c)
    assert files.read("/home/ops/.ssh/authorized_keys") == key + "\n"
    assert (tmp_path / "home/ops/.ssh/authorized_keys").stat().st_mode & 0o777 == 0o600
    assert files.owners["/home/ops/.ssh/authorized_keys"] == (1000, 1000)
    with pytest.raises(PlanError, match="user 'nobody2' does not exist"):
        customise.apply(
            files,
            "debian",
            customise.Customisation.from_plan({"ssh_authorized_keys": {"nobody2": [key]}}),
        )


def test_module_closure_follows_dependencies() -> None:
    dep = (
        "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko "
        "kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_modern_dev.ko "
        "kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_pci_modern_dev.ko:\n"
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/net/e1000.ko:\n"
    )
    mods = linux.module_closure(dep, ("virtio_pci", "virtio_blk", "virtio_scsi"))
    assert mods == sorted(
        [
            "kernel/drivers/block/virtio_blk.ko",
            "kernel/drivers/virtio/virtio.ko",
            "kernel/drivers/virtio/virtio_pci.ko",
            "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
            "kernel/drivers/virtio/virtio_ring.ko",
        ]
    )


def test_preflight_blockers_and_warnings() -> None:
    ok = preflight(inspection("debian"))
    assert ok.ok and ok.backend == "builtin"
    assert any(w.code == "hypervisor_tools" for w in ok.warnings)

    no_virtio = inspection(
        "debian", kernels=[KernelInfo("2.6.18", "/boot/vmlinuz-2.6.18", None, [], [], True)]
    )
    v = preflight(no_virtio)
    assert not v.ok and v.blockers[0].code == "no_virtio_kernel"
    assert "2.6.18" in v.blockers[0].message

    full = preflight(inspection("debian", free_root=10 * 1024**2, luks_locked=["/dev/sda3"]))
    codes = {b.code for b in full.blockers}
    assert {"free_space", "luks_no_key"} <= codes
    assert any("/dev/sda3" in b.message for b in full.blockers)

    unknown = preflight(inspection("debian", os_type="unknown"))
    assert [b.code for b in unknown.blockers] == ["unknown_os"]

    extlinux = preflight(inspection("debian", bootloader="extlinux"))
    assert any(b.code == "bootloader" for b in extlinux.blockers)
