"""Customise a converted Linux guest from the plan: hostname, static addresses, DNS, SSH keys.

The plan's part for one machine (JSON), all keys optional:

    {"hostname": "web01",
     "interfaces": [{"name": "eth0", "mac": "52:54:00:12:34:56",
                     "ipv4": ["10.0.0.5/24"], "gateway4": "10.0.0.1",
                     "ipv6": ["fd00::5/64"], "gateway6": "fd00::1",
                     "dns": ["10.0.0.53"], "dhcp4": false}],
     "ssh_authorized_keys": {"root": ["ssh-ed25519 AAAA... ops@site"]}}

Addresses are written in the configuration system the guest uses (ifupdown, netplan,
NetworkManager keyfiles, ifcfg). With ``mac`` the NIC with that MAC gets ``name`` through a
systemd .link file, so the plan does not depend on how the new hardware is enumerated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from appliance.convert import linuxconf
from appliance.convert.errors import PlanError
from appliance.convert.files import GuestFiles
from appliance.convert.linuxconf import Family, InterfacePlan

HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*$"
)
KNOWN_KEYS = {"hostname", "interfaces", "ssh_authorized_keys"}


@dataclass
class Customisation:
    hostname: str | None = None
    interfaces: list[InterfacePlan] = field(default_factory=list)
    ssh_authorized_keys: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def from_plan(cls, plan: dict[str, Any] | None, where: str = "$") -> Customisation:
        if not plan:
            return cls()
        if not isinstance(plan, dict):
            raise PlanError(f"{where} must be an object", hint="see appliance/convert/README.md")
        unknown = set(plan) - KNOWN_KEYS
        if unknown:
            raise PlanError(
                f"{where}: unknown keys {', '.join(sorted(unknown))}",
                hint=f"allowed: {', '.join(sorted(KNOWN_KEYS))}",
            )
        host = plan.get("hostname")
        if host is not None and (not isinstance(host, str) or not HOSTNAME.match(host)):
            raise PlanError(
                f"{where}.hostname {host!r} is not a valid host name",
                hint="letters, digits and hyphens, dot-separated",
            )
        ifs_raw = plan.get("interfaces", [])
        if not isinstance(ifs_raw, list):
            raise PlanError(f"{where}.interfaces must be a list", hint="[{...}, ...]")
        ifs = [
            InterfacePlan.from_dict(d, f"{where}.interfaces[{n}]") for n, d in enumerate(ifs_raw)
        ]
        keys = plan.get("ssh_authorized_keys", {})
        if not isinstance(keys, dict) or not all(
            isinstance(u, str) and isinstance(v, list) and all(isinstance(k, str) for k in v)
            for u, v in keys.items()
        ):
            raise PlanError(
                f"{where}.ssh_authorized_keys must map user names to lists of keys",
                hint='{"root": ["ssh-ed25519 AAAA..."]}',
            )
        for user, ks in keys.items():
            for n, k in enumerate(ks):
                if not re.match(r"^(ssh-|ecdsa-|sk-)\S+ \S+", k):
                    raise PlanError(
                        f"{where}.ssh_authorized_keys.{user}[{n}] is not a public key line",
                        hint="paste the line of the .pub file",
                    )
        return cls(hostname=host, interfaces=ifs, ssh_authorized_keys=keys)

    @property
    def empty(self) -> bool:
        return not (self.hostname or self.interfaces or self.ssh_authorized_keys)


def apply(files: GuestFiles, family: Family, c: Customisation) -> list[str]:
    """Write the customisation into a Linux guest tree; returns the changes made."""
    changes: list[str] = []
    if c.hostname:
        changes += _hostname(files, family, c.hostname)
    if c.interfaces:
        changes += linuxconf.write_network(files, family, c.interfaces)
        for path in [
            f"/etc/NetworkManager/system-connections/ferryman-{i.name}.nmconnection"
            for i in c.interfaces
        ]:
            if files.exists(path):
                files.chmod(path, 0o600)
    for user, keys in c.ssh_authorized_keys.items():
        changes += _ssh_keys(files, user, keys)
    return changes


def _hostname(files: GuestFiles, family: Family, name: str) -> list[str]:
    short = name.split(".")[0]
    files.write("/etc/hostname", name + "\n")
    if family == "suse":
        files.write("/etc/HOSTNAME", name + "\n")
    hosts = files.read("/etc/hosts") if files.exists("/etc/hosts") else "127.0.0.1\tlocalhost\n"
    entry = f"127.0.1.1\t{name}" + (f" {short}" if short != name else "")
    if re.search(r"^127\.0\.1\.1\s", hosts, re.M):
        hosts = re.sub(r"^127\.0\.1\.1\s.*$", entry, hosts, flags=re.M)
    else:
        hosts = hosts.rstrip("\n") + "\n" + entry + "\n"
    files.write("/etc/hosts", hosts)
    return [f"hostname: {name}"]


def _ssh_keys(files: GuestFiles, user: str, keys: list[str]) -> list[str]:
    uid = gid = None
    home = None
    if files.exists("/etc/passwd"):
        for line in files.read("/etc/passwd").splitlines():
            parts = line.split(":")
            if len(parts) >= 6 and parts[0] == user:
                uid, gid, home = int(parts[2]), int(parts[3]), parts[5]
    if uid is None or gid is None or home is None:
        raise PlanError(
            f"ssh_authorized_keys: user {user!r} does not exist in the guest",
            hint="name a user of the guest's /etc/passwd",
        )
    d = f"{home.rstrip('/')}/.ssh"
    path = f"{d}/authorized_keys"
    old = files.read(path) if files.exists(path) else ""
    have = set(old.splitlines())
    new = old + "".join(k + "\n" for k in keys if k not in have)
    files.write(path, new)
    files.chmod(d, 0o700)
    files.chmod(path, 0o600)
    files.chown(d, uid, gid)
    files.chown(path, uid, gid)
    return [f"ssh: {len(keys)} key(s) for {user} in {path}"]
