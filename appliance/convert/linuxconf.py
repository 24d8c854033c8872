"""Text-level knowledge of Linux guest configuration: fstab, grub defaults, network files.

Pure functions over strings and a GuestFiles tree; no libguestfs here, so every rule is unit
tested on file trees (tests/unit/test_convert_linuxconf.py), including the RHEL and SUSE
families that cannot be booted on the build machines.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.convert.files import GuestFiles, glob

Family = Literal["debian", "rhel", "suse", "arch", "unknown"]

# Device names that change when the disk moves from SATA/SCSI/Xen to virtio.
UNSTABLE_DEVICE = re.compile(r"^/dev/(sd[a-z]+|hd[a-z]+|xvd[a-z]+|vd[a-z]+|nvme\d+n\d+)(p?\d+)?$")
VIRTIO_MODULES = ("virtio_pci", "virtio_blk", "virtio_scsi", "virtio_net", "virtio_console")
# Guest tools of other hypervisors; removed so they do not fail or spin on KVM.
HYPERVISOR_TOOL_PACKAGES = {
    "open-vm-tools": "vmware",
    "open-vm-tools-desktop": "vmware",
    "open-vm-tools-sdmp": "vmware",
    "vmware-tools": "vmware",
    "VMwareTools": "vmware",
    "vmware-tools-core": "vmware",
    "hyperv-daemons": "hyperv",
    "hyperv-daemons-license": "hyperv",
    "hypervvssd": "hyperv",
    "hypervkvpd": "hyperv",
    "hypervfcopyd": "hyperv",
    "hyper-v": "hyperv",
    "xe-guest-utilities": "xen",
    "VMware Tools": "vmware",
}
# Tools installed without a package (VMware's tarball installer) leave these behind.
HYPERVISOR_TOOL_FILES = {
    "/etc/vmware-tools/locations": "vmware",
    "/usr/bin/vmware-uninstall-tools.pl": "vmware",
}


def family_of(distro: str) -> Family:
    d = distro.lower()
    if d in ("debian", "ubuntu", "linuxmint", "kalilinux", "devuan"):
        return "debian"
    if d in (
        "rhel",
        "centos",
        "fedora",
        "rocky",
        "almalinux",
        "oraclelinux",
        "scientificlinux",
        "circle",
        "redhat-based",
        "amazonlinux",
    ):
        return "rhel"
    if d in ("sles", "suse-based", "opensuse", "sled"):
        return "suse"
    if d in ("archlinux", "manjaro"):
        return "arch"
    return "unknown"


# --------------------------------------------------------------------------- fstab


@dataclass
class FstabEntry:
    spec: str
    mountpoint: str
    fstype: str
    options: str
    resolved: str | None = None  # the device it names in the inspected disk, if any


def parse_fstab(text: str) -> list[FstabEntry]:
    out = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        parts = s.split()
        if len(parts) < 3:
            continue
        out.append(FstabEntry(parts[0], parts[1], parts[2], parts[3] if len(parts) > 3 else ""))
    return out


def rewrite_fstab(text: str, uuid_of: dict[str, str]) -> tuple[str, list[str]]:
    """Replace device names (/dev/sda1) by UUID=; returns (new text, changes made)."""
    out, changes = [], []
    for line in text.splitlines(keepends=True):
        parts = line.split()
        if parts and not parts[0].startswith("#") and UNSTABLE_DEVICE.match(parts[0]):
            dev = parts[0]
            uuid = uuid_of.get(dev)
            if uuid:
                line = line.replace(dev, f"UUID={uuid}", 1)
                changes.append(f"fstab: {dev} -> UUID={uuid}")
        out.append(line)
    return "".join(out), changes


# --------------------------------------------------------------------------- kernel line


def rewrite_cmdline(cmdline: str, uuid_of: dict[str, str]) -> tuple[str, list[str]]:
    """root=/dev/sda1 and resume=/dev/sda5 to UUIDs."""
    changes: list[str] = []

    def repl(m: re.Match[str]) -> str:
        key, dev = m.group(1), m.group(2)
        uuid = uuid_of.get(dev)
        if uuid and UNSTABLE_DEVICE.match(dev):
            changes.append(f"kernel line: {key}={dev} -> {key}=UUID={uuid}")
            return f"{key}=UUID={uuid}"
        return m.group(0)

    return re.sub(r"\b(root|resume)=(/dev/[^\s\"']+)", repl, cmdline), changes


def ensure_serial_console(cmdline: str) -> str:
    if re.search(r"\bconsole=ttyS\d", cmdline):
        return cmdline
    extra = "console=tty0 console=ttyS0,115200n8"
    return f"{cmdline} {extra}".strip()


def edit_grub_defaults(
    text: str, *, serial: bool, use_uuid: bool, ifnames0: bool
) -> tuple[str, list[str]]:
    """Edit /etc/default/grub: serial console, UUID roots, legacy NIC names when asked."""
    changes: list[str] = []
    lines = text.splitlines()
    found_cmdline = False
    for i, line in enumerate(lines):
        m = re.match(r'^(GRUB_CMDLINE_LINUX)=(["\']?)(.*?)\2\s*$', line)
        if m:
            found_cmdline = True
            value = m.group(3)
            new = value
            if serial:
                new = ensure_serial_console(new)
            if ifnames0 and "net.ifnames=0" not in new:
                new = f"{new} net.ifnames=0".strip()
            if new != value:
                lines[i] = f'GRUB_CMDLINE_LINUX="{new}"'
                changes.append(f"grub: GRUB_CMDLINE_LINUX={new!r}")
        if use_uuid and re.match(r"^GRUB_DISABLE_LINUX_UUID=", line):
            lines[i] = "GRUB_DISABLE_LINUX_UUID=false"
            changes.append("grub: root by UUID (GRUB_DISABLE_LINUX_UUID=false)")
    if not found_cmdline:
        value = ""
        if serial:
            value = ensure_serial_console(value)
        if ifnames0:
            value = f"{value} net.ifnames=0".strip()
        lines.append(f'GRUB_CMDLINE_LINUX="{value}"')
        changes.append(f"grub: GRUB_CMDLINE_LINUX={value!r}")
    if serial and not any(ln.startswith("GRUB_TERMINAL") for ln in lines):
        lines.append('GRUB_TERMINAL="console serial"')
        lines.append('GRUB_SERIAL_COMMAND="serial --speed=115200 --unit=0"')
        changes.append("grub: menu on console and serial")
    return "\n".join(lines) + "\n", changes


def grub_cfg_default_entry(text: str) -> tuple[str | None, str | None, str | None]:
    """(kernel path, initrd path, cmdline) of the first menu entry of a grub.cfg."""
    in_entry = False
    kernel = initrd = cmdline = None
    for line in text.splitlines():
        s = line.strip()
        word = s.split(None, 1)[0] if s else ""
        if word == "menuentry":
            in_entry = True
            continue
        if not in_entry:
            continue
        if word in ("linux", "linux16", "linuxefi") and kernel is None:
            parts = s.split(None, 2)
            kernel = parts[1]
            cmdline = parts[2].strip() if len(parts) > 2 else ""
        elif word in ("initrd", "initrd16", "initrdefi") and initrd is None:
            initrd = s.split()[-1]
        elif s == "}":
            break
    return kernel, initrd, cmdline


# --------------------------------------------------------------------------- network


@dataclass
class NetworkConfig:
    kind: str  # ifupdown | netplan | networkmanager | ifcfg | systemd-networkd | udev
    path: str
    interfaces: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    dhcp: bool = False
    mac_bindings: list[str] = field(default_factory=list)  # offending lines, as found


MAC = r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}"


def network_configs(files: GuestFiles) -> list[NetworkConfig]:
    out: list[NetworkConfig] = []
    for path in ["/etc/network/interfaces", *glob(files, "/etc/network/interfaces.d/*")]:
        if not files.exists(path) or files.is_dir(path):
            continue
        text = files.read(path)
        nc = NetworkConfig("ifupdown", path)
        for line in text.splitlines():
            s = line.strip()
            if s.startswith("iface "):
                parts = s.split()
                if parts[1] != "lo":
                    nc.interfaces.append(parts[1])
                    nc.dhcp = nc.dhcp or (len(parts) > 3 and parts[3] == "dhcp")
            elif s.startswith("address "):
                nc.addresses.append(s.split()[1])
            elif s.startswith("hwaddress "):
                nc.mac_bindings.append(s)
        out.append(nc)
    for path in glob(files, "/etc/netplan/*.yaml") + glob(files, "/etc/netplan/*.yml"):
        text = files.read(path)
        nc = NetworkConfig("netplan", path)
        nc.interfaces = re.findall(r"^\s{4}([A-Za-z0-9_.-]+):\s*$", text, re.M)
        nc.addresses = re.findall(r"-\s*\"?([0-9a-fA-F.:]+/\d+)\"?", text)
        nc.dhcp = bool(re.search(r"dhcp[46]:\s*(true|yes)", text))
        nc.mac_bindings = [s.strip() for s in text.splitlines() if re.search(r"macaddress:", s)]
        out.append(nc)
    for path in glob(files, "/etc/NetworkManager/system-connections/*"):
        text = files.read(path)
        nc = NetworkConfig("networkmanager", path)
        m = re.search(r"^interface-name=(.+)$", text, re.M)
        if m:
            nc.interfaces.append(m.group(1).strip())
        nc.addresses = [a.split(",")[0] for a in re.findall(r"^address\d*=(.+)$", text, re.M)]
        nc.dhcp = bool(re.search(r"^method=auto", text, re.M))
        nc.mac_bindings = re.findall(r"^(?:mac-address|cloned-mac-address)=.*$", text, re.M)
        out.append(nc)
    for pattern in ("/etc/sysconfig/network-scripts/ifcfg-*", "/etc/sysconfig/network/ifcfg-*"):
        for path in glob(files, pattern):
            if path.endswith("ifcfg-lo"):
                continue
            text = files.read(path)
            nc = NetworkConfig("ifcfg", path)
            kv = _shell_vars(text)
            nc.interfaces.append(kv.get("DEVICE", path.rsplit("ifcfg-", 1)[1]))
            if "IPADDR" in kv:
                prefix = kv.get("PREFIX", "")
                nc.addresses.append(kv["IPADDR"] + (f"/{prefix}" if prefix else ""))
            nc.dhcp = kv.get("BOOTPROTO", "").lower() == "dhcp"
            nc.mac_bindings = re.findall(r"^(?:HWADDR|MACADDR|LLADDR)=.*$", text, re.M)
            out.append(nc)
    for path in glob(files, "/etc/systemd/network/*.network") + glob(
        files, "/etc/systemd/network/*.link"
    ):
        text = files.read(path)
        nc = NetworkConfig("systemd-networkd", path)
        nc.interfaces = re.findall(r"^Name=(.+)$", text, re.M)
        nc.addresses = re.findall(r"^Address=(.+)$", text, re.M)
        nc.mac_bindings = re.findall(r"^MACAddress=.*$", text, re.M)
        out.append(nc)
    for path in glob(files, "/etc/udev/rules.d/*persistent-net*.rules"):
        text = files.read(path)
        nc = NetworkConfig("udev", path)
        nc.interfaces = re.findall(r'NAME="([^"]+)"', text)
        nc.mac_bindings = [
            ln.strip()
            for ln in text.splitlines()
            if "ATTR{address}" in ln and not ln.startswith("#")
        ]
        out.append(nc)
    return out


def _shell_vars(text: str) -> dict[str, str]:
    kv = {}
    for line in text.splitlines():
        m = re.match(r"^\s*([A-Z0-9_]+)=(.*)$", line)
        if m:
            try:
                vals = shlex.split(m.group(2))
            except ValueError:
                vals = [m.group(2)]
            kv[m.group(1)] = vals[0] if vals else ""
    return kv


def drop_mac_bindings(files: GuestFiles) -> list[str]:
    """Remove every binding of a network configuration to the old hardware's MAC address."""
    changes: list[str] = []
    for nc in network_configs(files):
        if not nc.mac_bindings:
            continue
        path = nc.path
        text = files.read(path)
        if nc.kind == "udev" or (nc.kind == "systemd-networkd" and path.endswith(".link")):
            files.remove(path)
            changes.append(f"network: removed {path} (names NICs by old MAC addresses)")
            continue
        if nc.kind == "ifupdown":
            new = "\n".join(
                ln for ln in text.splitlines() if not ln.strip().startswith("hwaddress ")
            )
        elif nc.kind == "netplan":
            new = _netplan_drop_mac(text)
        elif nc.kind == "networkmanager":
            new = re.sub(r"^(?:mac-address|cloned-mac-address)=.*\n?", "", text, flags=re.M)
        elif nc.kind == "ifcfg":
            new = re.sub(r"^(?:HWADDR|MACADDR|LLADDR)=.*\n?", "", text, flags=re.M)
        else:  # .network files: a [Match] MACAddress= line
            new = re.sub(r"^MACAddress=.*\n?", "", text, flags=re.M)
        if not new.endswith("\n"):
            new += "\n"
        files.write(path, new)
        changes.append(f"network: dropped MAC binding in {path}")
    return changes


def _netplan_drop_mac(text: str) -> str:
    """Drop `match: {macaddress: ...}` blocks (and the set-name that goes with them)."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        s = line.strip()
        if s == "match:":
            indent = len(line) - len(line.lstrip())
            j = i + 1
            block = []
            while j < len(lines) and (len(lines[j]) - len(lines[j].lstrip())) > indent:
                block.append(lines[j])
                j += 1
            kept = [b for b in block if "macaddress:" not in b]
            if kept:
                out.append(line)
                out.extend(kept)
            i = j
            continue
        if s.startswith("set-name:") or s.startswith("macaddress:"):
            i += 1
            continue
        out.append(line)
        i += 1
    return "\n".join(out) + "\n"


def uses_legacy_names(configs: list[NetworkConfig]) -> bool:
    """True when the configuration names NICs ethN (which only kernel naming gives on KVM)."""
    names = {n for c in configs for n in c.interfaces}
    return bool(names) and all(re.fullmatch(r"eth\d+", n) for n in names)


# --------------------------------------------------------------------------- customise


@dataclass
class InterfacePlan:
    name: str
    mac: str | None = None
    ipv4: list[str] = field(default_factory=list)  # CIDR, "10.0.0.5/24"
    gateway4: str | None = None
    ipv6: list[str] = field(default_factory=list)
    gateway6: str | None = None
    dns: list[str] = field(default_factory=list)
    dhcp4: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str) -> InterfacePlan:
        from appliance.convert.errors import PlanError

        if not isinstance(d, dict) or not isinstance(d.get("name"), str):
            raise PlanError(
                f"{where}.name is missing", hint='give each interface a name, e.g. "eth0"'
            )
        for key in ("ipv4", "ipv6", "dns"):
            v = d.get(key, [])
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise PlanError(f"{where}.{key} must be a list of strings", hint=f"got {v!r}")
        for a in d.get("ipv4", []) + d.get("ipv6", []):
            if "/" not in a:
                raise PlanError(
                    f"{where}: address {a!r} has no prefix length", hint='write "10.0.0.5/24"'
                )
        mac = d.get("mac")
        if mac is not None and not re.fullmatch(MAC, str(mac)):
            raise PlanError(f"{where}.mac {mac!r} is not a MAC address", hint="aa:bb:cc:dd:ee:ff")
        return cls(
            name=d["name"],
            mac=mac,
            ipv4=list(d.get("ipv4", [])),
            gateway4=d.get("gateway4"),
            ipv6=list(d.get("ipv6", [])),
            gateway6=d.get("gateway6"),
            dns=list(d.get("dns", [])),
            dhcp4=bool(d.get("dhcp4", False)),
        )


def render_ifupdown(ifs: list[InterfacePlan]) -> str:
    out = ["# Written by Ferryman from the plan", ""]
    for i in ifs:
        out.append(f"auto {i.name}")
        if i.dhcp4:
            out.append(f"iface {i.name} inet dhcp")
        for n, addr in enumerate(i.ipv4):
            if n == 0:
                out.append(f"iface {i.name} inet static")
            out.append(f"    address {addr}")
            if n == 0 and i.gateway4:
                out.append(f"    gateway {i.gateway4}")
            if n == 0 and i.dns:
                out.append(f"    dns-nameservers {' '.join(i.dns)}")
        for n, addr in enumerate(i.ipv6):
            if n == 0:
                out.append(f"iface {i.name} inet6 static")
            out.append(f"    address {addr}")
            if n == 0 and i.gateway6:
                out.append(f"    gateway {i.gateway6}")
        out.append("")
    return "\n".join(out)


def render_netplan(ifs: list[InterfacePlan]) -> str:
    out = ["# Written by Ferryman from the plan", "network:", "  version: 2", "  ethernets:"]
    for i in ifs:
        out.append(f"    {i.name}:")
        if i.mac:
            out += [
                "      match:",
                f"        macaddress: {i.mac.lower()}",
                f"      set-name: {i.name}",
            ]
        out.append(f"      dhcp4: {'true' if i.dhcp4 else 'false'}")
        addrs = i.ipv4 + i.ipv6
        if addrs:
            out.append("      addresses:")
            out += [f'        - "{a}"' for a in addrs]
        routes = [(g, "0.0.0.0/0") for g in [i.gateway4] if g] + [
            (g, "::/0") for g in [i.gateway6] if g
        ]
        if routes:
            out.append("      routes:")
            for gw, to in routes:
                out += [f'        - to: "{to}"', f'          via: "{gw}"']
        if i.dns:
            out += ["      nameservers:", f"        addresses: [{', '.join(i.dns)}]"]
    return "\n".join(out) + "\n"


def render_nm_keyfile(i: InterfacePlan) -> str:
    out = [
        "[connection]",
        f"id={i.name}",
        "type=ethernet",
        f"interface-name={i.name}",
        "autoconnect=true",
        "",
        "[ethernet]",
    ]
    if i.mac:
        out.append(f"mac-address={i.mac.upper()}")
    out += ["", "[ipv4]"]
    if i.ipv4:
        out.append("method=manual")
        for n, a in enumerate(i.ipv4, 1):
            gw = f",{i.gateway4}" if n == 1 and i.gateway4 else ""
            out.append(f"address{n}={a}{gw}")
        v4dns = [d for d in i.dns if ":" not in d]
        if v4dns:
            out.append(f"dns={';'.join(v4dns)};")
    else:
        out.append("method=auto" if i.dhcp4 else "method=disabled")
    out += ["", "[ipv6]"]
    if i.ipv6:
        out.append("method=manual")
        for n, a in enumerate(i.ipv6, 1):
            gw = f",{i.gateway6}" if n == 1 and i.gateway6 else ""
            out.append(f"address{n}={a}{gw}")
        v6dns = [d for d in i.dns if ":" in d]
        if v6dns:
            out.append(f"dns={';'.join(v6dns)};")
    else:
        out.append("method=ignore")
    return "\n".join(out) + "\n"


def render_ifcfg(i: InterfacePlan) -> str:
    out = [f"DEVICE={i.name}", "TYPE=Ethernet", "ONBOOT=yes"]
    if i.mac:
        out.append(f"HWADDR={i.mac.upper()}")
    if i.ipv4:
        out.append("BOOTPROTO=none")
        for n, a in enumerate(i.ipv4):
            ip, prefix = a.split("/")
            sfx = "" if n == 0 else str(n)
            out += [f"IPADDR{sfx}={ip}", f"PREFIX{sfx}={prefix}"]
        if i.gateway4:
            out.append(f"GATEWAY={i.gateway4}")
    else:
        out.append("BOOTPROTO=dhcp" if i.dhcp4 else "BOOTPROTO=none")
    if i.ipv6:
        out += ["IPV6INIT=yes", "IPV6_AUTOCONF=no", f"IPV6ADDR={i.ipv6[0]}"]
        if len(i.ipv6) > 1:
            out.append(f'IPV6ADDR_SECONDARIES="{" ".join(i.ipv6[1:])}"')
        if i.gateway6:
            out.append(f"IPV6_DEFAULTGW={i.gateway6}")
    for n, d in enumerate(i.dns, 1):
        out.append(f"DNS{n}={d}")
    return "\n".join(out) + "\n"


def render_link(i: InterfacePlan) -> str:
    """systemd .link file: give the NIC with the plan's MAC the plan's name (udev applies it)."""
    assert i.mac
    return f"[Match]\nMACAddress={i.mac.lower()}\n\n[Link]\nName={i.name}\n"


def network_stack(files: GuestFiles, family: Family) -> str:
    """Which configuration system the guest actually uses."""
    if glob(files, "/etc/netplan/*.yaml") or glob(files, "/etc/netplan/*.yml"):
        return "netplan"
    if files.exists("/etc/network/interfaces") and (
        files.exists("/sbin/ifup") or files.exists("/usr/sbin/ifup")
    ):
        return "ifupdown"
    nm = files.exists("/usr/sbin/NetworkManager")
    if family == "rhel" and files.is_dir("/etc/sysconfig/network-scripts") and not nm:
        return "ifcfg"
    if family == "suse" and files.is_dir("/etc/sysconfig/network") and not nm:
        return "ifcfg-suse"
    if nm or files.is_dir("/etc/NetworkManager/system-connections"):
        return "networkmanager"
    if family == "rhel":
        return "ifcfg"
    return "ifupdown"


def write_network(files: GuestFiles, family: Family, ifs: list[InterfacePlan]) -> list[str]:
    """Write the plan's addresses in the guest's own configuration system."""
    stack = network_stack(files, family)
    changes: list[str] = []
    for i in ifs:
        if i.mac:
            path = f"/etc/systemd/network/10-ferryman-{i.name}.link"
            files.write(path, render_link(i))
            changes.append(f"network: {path} names the NIC {i.mac} {i.name}")
    if stack == "ifupdown":
        names = {i.name for i in ifs}
        # Keep the loopback and any stanza of interfaces the plan does not mention.
        kept = (
            _ifupdown_without(files.read("/etc/network/interfaces"), names)
            if files.exists("/etc/network/interfaces")
            else "auto lo\niface lo inet loopback\n"
        )
        for extra in glob(files, "/etc/network/interfaces.d/*"):
            if not files.is_dir(extra):
                files.write(extra, _ifupdown_without(files.read(extra), names))
        files.write("/etc/network/interfaces", kept.rstrip() + "\n\n" + render_ifupdown(ifs))
        dns = [d for i in ifs for d in i.dns]
        if dns and not files.exists("/sbin/resolvconf"):
            files.write("/etc/resolv.conf", "".join(f"nameserver {d}\n" for d in dns))
        changes.append("network: /etc/network/interfaces from the plan")
    elif stack == "netplan":
        for path in glob(files, "/etc/netplan/*.yaml") + glob(files, "/etc/netplan/*.yml"):
            files.remove(path)
        files.write("/etc/netplan/90-ferryman.yaml", render_netplan(ifs))
        changes.append("network: /etc/netplan/90-ferryman.yaml from the plan")
    elif stack == "networkmanager":
        for i in ifs:
            for path in glob(files, "/etc/NetworkManager/system-connections/*"):
                if f"interface-name={i.name}" in files.read(path):
                    files.remove(path)
            path = f"/etc/NetworkManager/system-connections/ferryman-{i.name}.nmconnection"
            files.write(path, render_nm_keyfile(i))
            changes.append(f"network: {path} from the plan (mode 0600 needed)")
    else:
        base = "/etc/sysconfig/network-scripts" if stack == "ifcfg" else "/etc/sysconfig/network"
        for i in ifs:
            text = render_ifcfg(i)
            if stack == "ifcfg-suse":
                text = text.replace("ONBOOT=yes", "STARTMODE=auto").replace(
                    "BOOTPROTO=none", "BOOTPROTO=static"
                )
            files.write(f"{base}/ifcfg-{i.name}", text)
            changes.append(f"network: {base}/ifcfg-{i.name} from the plan")
    return changes


def _ifupdown_without(text: str, names: set[str]) -> str:
    """Remove the stanzas (auto/allow-hotplug/iface blocks) of the named interfaces."""
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        s = line.strip()
        words = s.split()
        if words and words[0] in ("auto", "allow-hotplug") and len(words) > 1:
            rest = [w for w in words[1:] if w not in names]
            skipping = False
            if rest:
                out.append(f"{words[0]} {' '.join(rest)}")
            continue
        if words and words[0] == "iface":
            skipping = len(words) > 1 and words[1] in names
            if not skipping:
                out.append(line)
            continue
        if words and words[0] in ("source", "source-directory", "mapping"):
            skipping = False
        if skipping and (line.startswith((" ", "\t")) or not s):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out) + "\n"
