"""First boot of the appliance image with the other settings (tests/e2e/test_appliance_image.py
boots it with DHCP, keys and an empty data disk): a static address, passwords, time zone, a
clock set without NTP, and only a disk that holds someone's file system, which first boot must
leave alone, so the volume store stays on the system disk with a warning.

The static address is not the one slirp's DHCP hands out, and SSH is forwarded to it: the
appliance answers only when the static configuration is in force.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.appliance_vm import BOOT_TIMEOUT_S, Appliance, build_image, running

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.timeout(3600),  # includes an image build when an input changed
    pytest.mark.appliance_vm,  # scripts/test --appliance (boots under TCG)
]

HOST = "fm-static"
ADDRESS = "10.0.2.20"  # slirp's DHCP would give 10.0.2.15
OP_PASSWORD = "Op-first-boot-7"
ADMIN_SALT = "fmsalt01"
ADMIN_PASSWORD = "Admin-first-boot-9"
CLOCK = "2031-03-04 05:06:07"
CUSTOMER_DATA = "not the appliance's: never format me\n"


def _sha512_crypt(password: str, salt: str) -> str:
    return subprocess.run(
        ["openssl", "passwd", "-6", "-salt", salt, password],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    conf = (
        f"hostname={HOST}\n"
        "network=static   # a comment after the value, as in docs/appliance.md\n"
        f"address={ADDRESS}/24\n"
        "gateway=10.0.2.2\n"
        "dns=10.0.2.3\n"
        f"operator_password={OP_PASSWORD}\n"
        f"admin_password_hash={_sha512_crypt(ADMIN_PASSWORD, ADMIN_SALT)}\n"
        "timezone=Europe/Berlin\n"
        "ntp=192.0.2.123\n"  # TEST-NET-1: never answers, so the clock below stays
        f"time={CLOCK}       # UTC\n"
        "data_disk=auto\n"
    )
    work = tmp_path_factory.mktemp("appliance-static")
    # A disk that holds someone's data (a file system, not ours): first boot must not take it.
    (work / "customer").mkdir()
    (work / "customer" / "payroll.txt").write_text(CUSTOMER_DATA)
    customer = work / "customer.img"
    subprocess.run(
        ["mkfs.ext4", "-q", "-L", "customer", "-d", str(work / "customer"), str(customer), "1536M"],
        check=True,
    )
    with running(
        build_image(),
        work,
        firstboot=conf,
        data_disk=False,
        extra_disks=(customer,),
        guest_ip=ADDRESS,
    ) as vm:
        vm.wait_ssh(BOOT_TIMEOUT_S)
        yield vm


def test_static_address_hostname_and_dns(appliance: Appliance) -> None:
    r = appliance.admin(
        "hostname; ip -4 -o addr show scope global | awk '{print $4}'; "
        "grep -h '^DNS=' /etc/systemd/network/10-ferryman.network; "
        "networkctl status --no-pager 2>/dev/null | grep -c DHCP4 || true"
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    assert lines[0] == HOST
    assert lines[1] == f"{ADDRESS}/24", r.stdout  # SSH reached us there: the static address
    assert lines[2] == "DNS=10.0.2.3"
    assert lines[3] == "0", r.stdout  # no DHCP lease on the side


def test_passwords_from_the_seed(appliance: Appliance, tmp_path: Path) -> None:
    shadow = appliance.admin("sudo getent shadow op admin").stdout.splitlines()
    hashes = {line.split(":")[0]: line.split(":")[1] for line in shadow}
    assert hashes["admin"] == _sha512_crypt(ADMIN_PASSWORD, ADMIN_SALT)
    assert hashes["op"].startswith("$"), hashes  # chpasswd's hash (yescrypt on Debian 12)
    # The operator logs in over SSH with that password (and gets only the TUI wrapper).
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho '{OP_PASSWORD}'\n")
    askpass.chmod(0o700)
    argv = [
        "ssh",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "PubkeyAuthentication=no",
        "-o",
        "PreferredAuthentications=password",
        "-o",
        "NumberOfPasswordPrompts=1",
        "-p",
        str(appliance.port),
        "op@127.0.0.1",
        "true",
    ]
    env = {"PATH": "/usr/bin:/bin", "SSH_ASKPASS": str(askpass), "SSH_ASKPASS_REQUIRE": "force"}
    r = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    assert "opens the Ferryman text UI only" in r.stderr, r.stderr  # logged in, no shell
    askpass.write_text("#!/bin/sh\necho wrong-password\n")
    r = subprocess.run(
        argv, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr


def test_time_zone_and_clock_without_ntp(appliance: Appliance) -> None:
    r = appliance.admin(
        "readlink /etc/localtime; date -u +%Y-%m-%d; date +%Z; "
        "cat /etc/systemd/timesyncd.conf.d/ferryman.conf"
    )
    lines = r.stdout.split()
    assert lines[0].endswith("Europe/Berlin")
    # Set at first boot; the boot and these tests take minutes, not days.
    assert lines[1] in ("2031-03-04", "2031-03-05"), r.stdout
    assert lines[2] in ("CET", "CEST")
    assert "NTP=192.0.2.123" in r.stdout


def test_a_used_disk_is_not_taken_so_the_volume_store_stays_on_the_system_disk_with_a_warning(
    appliance: Appliance,
) -> None:
    r = appliance.admin(
        "mountpoint -q /var/lib/ferryman/volumes && echo mounted || echo system; "
        "sudo cat /var/lib/ferryman/firstboot.done; cat /etc/issue.d/ferryman-volumes.issue; "
        "journalctl -b -u ferryman-firstboot -u ferryman-volumes --no-pager -o cat"
    )
    assert r.stdout.splitlines()[0] == "system", r.stdout
    assert "/dev/vdb is not empty: not used" in r.stdout
    data = appliance.admin(
        "sudo blkid -s LABEL -o value /dev/vdb; sudo debugfs -R 'cat /payroll.txt' /dev/vdb"
    )
    assert data.stdout == "customer\n" + CUSTOMER_DATA, data.stdout + data.stderr
    assert "volume_disk=system" in r.stdout
    assert r.stdout.count("WARNING: the volume store /var/lib/ferryman/volumes is on the") >= 2
    console = appliance.serial.read_bytes().decode(errors="replace")
    assert "WARNING: the volume store" in console
