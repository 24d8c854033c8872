"""libvirt objects of test runs and cutovers: XML builders, create/destroy, leftovers.

Naming is how clean-up finds what a crashed daemon left behind, so every object carries the
appliance's instance tag (a random id kept in the store's settings: two appliances, or two
test stores, on one host never touch each other's objects) and the run:

    domain   fm-<inst>-t<run>-<machine>      test run (transient: gone once destroyed)
    domain   fm-<inst>-c<run>-<machine>      cutover target (persistent, autostart)
    network  fm-<inst>-t<run>-<net>          isolated test network (transient)
    bridge   fm<inst>t<run>n<i>              15 characters at most (Linux IFNAMSIZ)

Domains run qemu as root (a static DAC label, no relabelling): the volume store is root-only
(ferrymand's umask is 077) and relabelling would chown restore points that other readers use.
The domain type comes from the KVM probe: 'qemu' (TCG) where nested KVM does not work.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import secrets
import time
import uuid as uuid_mod
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
from sqlite_utils import Database

from appliance.plans.errors import RunError
from store.records import get_setting, set_setting

log = logging.getLogger(__name__)

URI = "qemu:///system"
METADATA_NS = "https://ferryman.invalid/xmlns/plan-run/1"
DESTROY_GRACE_S = 10.0  # a transient domain is gone within this after destroy()
AGENT_CHANNEL = "org.qemu.guest_agent.0"

libvirt.registerErrorHandler(lambda _c, _e: None, None)  # never print to the terminal


def instance_tag(db: Database) -> str:
    """Four hex digits naming this store's libvirt objects; made once, kept in settings."""
    tag = get_setting(db, "plans.instance")
    if not tag:
        tag = secrets.token_hex(2)
        set_setting(db, "plans.instance", tag)
    return str(tag)


def domain_type(db: Database) -> str:
    verdict = get_setting(db, "probe") or {}
    return str(verdict.get("domain_type") or "qemu")  # no verdict yet: TCG never hangs


def prefix(inst: str, kind: str, run_id: int) -> str:
    return f"fm-{inst}-{kind[0]}{run_id}-"


def bridge_name(inst: str, kind: str, run_id: int, index: int) -> str:
    name = f"fm{inst}{kind[0]}{run_id}n{index}"
    if len(name) > 15:
        raise RunError(
            f"bridge name {name} is longer than 15 characters",
            hint="too many runs on this store; this needs a fresh instance tag",
        )
    return name


def connect() -> Any:
    try:
        return libvirt.open(URI)
    except libvirt.libvirtError as e:
        raise RunError(
            f"cannot connect to libvirt at {URI}: {e.get_error_message()}",
            hint="start libvirtd and virtlogd (virtlogd -d; libvirtd -d)",
        ) from e


# -- XML ---------------------------------------------------------------------------------------


@dataclass
class NicSpec:
    mac: str
    network: str | None = None  # libvirt network name
    bridge: str | None = None  # host bridge (bridged production network)


@dataclass
class DomainSpec:
    name: str
    title: str
    memory_mib: int
    cpus: int
    disks: list[Path]
    console_log: Path
    domain_type: str = "qemu"
    disk_bus: str = "virtio"
    firmware: str = "bios"
    nics: list[NicSpec] = field(default_factory=list)
    cache: str = "unsafe"  # test runs: throw-away overlays; cutover passes "none"
    metadata: dict[str, str] = field(default_factory=dict)
    uuid: str = field(default_factory=lambda: str(uuid_mod.uuid4()))  # define after create


def domain_xml(s: DomainSpec) -> str:
    d = ET.Element("domain", type=s.domain_type)
    ET.SubElement(d, "name").text = s.name
    ET.SubElement(d, "uuid").text = s.uuid
    ET.SubElement(d, "title").text = s.title
    md = ET.SubElement(d, "metadata")
    ET.SubElement(md, f"{{{METADATA_NS}}}run", {k: str(v) for k, v in s.metadata.items()})
    ET.SubElement(d, "memory", unit="MiB").text = str(s.memory_mib)
    ET.SubElement(d, "vcpu").text = str(s.cpus)
    os_el = (
        ET.SubElement(d, "os", firmware="efi") if s.firmware == "uefi" else ET.SubElement(d, "os")
    )
    ET.SubElement(
        os_el, "type", arch="x86_64", machine="q35" if s.firmware == "uefi" else "pc"
    ).text = "hvm"
    feats = ET.SubElement(d, "features")
    ET.SubElement(feats, "acpi")
    ET.SubElement(feats, "apic")
    ET.SubElement(d, "on_poweroff").text = "destroy"
    ET.SubElement(d, "on_reboot").text = "restart"
    ET.SubElement(d, "on_crash").text = "destroy"
    dev = ET.SubElement(d, "devices")
    prefix_dev = {"virtio": "vd", "sata": "sd", "scsi": "sd"}[s.disk_bus]
    if s.disk_bus == "scsi":
        ET.SubElement(dev, "controller", type="scsi", model="virtio-scsi")
    for i, path in enumerate(s.disks):
        disk = ET.SubElement(dev, "disk", type="file", device="disk")
        ET.SubElement(disk, "driver", name="qemu", type="qcow2", cache=s.cache, discard="unmap")
        ET.SubElement(disk, "source", file=str(path))
        ET.SubElement(disk, "target", dev=f"{prefix_dev}{chr(ord('a') + i)}", bus=s.disk_bus)
        if i == 0:
            ET.SubElement(disk, "boot", order="1")
    for n in s.nics:
        if n.bridge:
            iface = ET.SubElement(dev, "interface", type="bridge")
            ET.SubElement(iface, "source", bridge=n.bridge)
        else:
            iface = ET.SubElement(dev, "interface", type="network")
            ET.SubElement(iface, "source", network=str(n.network))
        ET.SubElement(iface, "mac", address=n.mac)
        ET.SubElement(iface, "model", type="virtio")
    serial = ET.SubElement(dev, "serial", type="file")
    ET.SubElement(serial, "source", path=str(s.console_log), append="on")
    ET.SubElement(serial, "target", port="0")
    chan = ET.SubElement(dev, "channel", type="unix")
    ET.SubElement(chan, "target", type="virtio", name=AGENT_CHANNEL)
    # Without a display adapter GRUB on some guests never reaches the kernel.
    video = ET.SubElement(dev, "video")
    ET.SubElement(video, "model", type="vga")
    ET.SubElement(dev, "memballoon", model="none")
    sec = ET.SubElement(d, "seclabel", type="static", model="dac", relabel="no")
    ET.SubElement(sec, "label").text = "+0:+0"
    ET.register_namespace("fm", METADATA_NS)
    return ET.tostring(d, encoding="unicode")


def host_address(
    subnet: str, gateway: str | None
) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """The appliance's own address on an isolated network: the plan's gateway, else the last
    host address (first addresses are where plans usually put servers)."""
    net = ipaddress.ip_network(subnet)
    ip = ipaddress.ip_address(gateway) if gateway else net.broadcast_address - 1
    return ipaddress.ip_interface(f"{ip}/{net.prefixlen}")


def network_xml(name: str, bridge: str, subnet: str | None, gateway: str | None, dhcp: bool) -> str:
    """An isolated network: no <forward>, so guests reach each other and the appliance only."""
    n = ET.Element("network")
    ET.SubElement(n, "name").text = name
    ET.SubElement(n, "bridge", name=bridge, stp="on", delay="0")
    if not dhcp:
        ET.SubElement(n, "dns", enable="no")  # no dnsmasq needed without DHCP
    if subnet:
        host = host_address(subnet, gateway)
        ip = ET.SubElement(n, "ip", address=str(host.ip), prefix=str(host.network.prefixlen))
        if dhcp and host.version == 4:
            hosts = list(host.network.hosts())
            # The upper half of the subnet: the lower half is where static addresses go.
            lo = hosts[len(hosts) // 2]
            hi = hosts[-2] if len(hosts) > 2 else hosts[-1]
            d = ET.SubElement(ip, "dhcp")
            ET.SubElement(d, "range", start=str(lo), end=str(hi))
    return ET.tostring(n, encoding="unicode")


# -- lifecycle ---------------------------------------------------------------------------------


def create_network(conn: Any, xml: str, *, persistent: bool = False) -> None:
    try:
        if persistent:
            net = conn.networkDefineXML(xml)
            net.setAutostart(True)
            net.create()
        else:
            conn.networkCreateXML(xml)
    except libvirt.libvirtError as e:
        name = ET.fromstring(xml).findtext("name")
        msg = str(e.get_error_message())
        hint = (
            "DHCP on a plan network needs dnsmasq: install dnsmasq-base, or set dhcp false "
            "and give the NICs static addresses"
            if "dnsmasq" in msg
            else "another network may use the same subnet on this host; change the plan's "
            "subnet or remove the conflicting network"
        )
        raise RunError(f"libvirt refused network {name}: {msg}", hint=hint) from e


def start_domain(conn: Any, xml: str, *, persistent: bool = False, paused: bool = False) -> Any:
    """Start a domain; ``paused``: its CPUs wait for resume_domain() (qemu is up, memory
    allocated, nothing runs), so libvirt's start-up cost is paid before the boot is due."""
    name = ET.fromstring(xml).findtext("name")
    flags = libvirt.VIR_DOMAIN_START_PAUSED if paused else 0
    try:
        if persistent:
            dom = conn.defineXML(xml)
            dom.setAutostart(True)
            dom.createWithFlags(flags)
            return dom
        return conn.createXML(xml, flags)
    except libvirt.libvirtError as e:
        raise RunError(
            f"libvirt could not start domain {name}: {e.get_error_message()}",
            hint="check libvirtd's log (/var/log/libvirt/qemu/) and the host's free memory",
        ) from e


def persist_domain(conn: Any, xml: str) -> None:
    """Make a running transient domain persistent with autostart (same name and UUID).
    Done after readiness: a define costs libvirt as much as a start on some hosts."""
    name = ET.fromstring(xml).findtext("name")
    try:
        dom = conn.defineXML(xml)
        dom.setAutostart(True)
    except libvirt.libvirtError as e:
        raise RunError(
            f"libvirt could not make domain {name} persistent: {e.get_error_message()}",
            hint=f"it runs but will not survive a host reboot: virsh dumpxml {name} > "
            f"{name}.xml && virsh define {name}.xml && virsh autostart {name}",
        ) from e


def resume_domain(conn: Any, name: str) -> None:
    try:
        dom = conn.lookupByName(name)
        if dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED:
            dom.resume()
    except libvirt.libvirtError as e:
        raise RunError(
            f"libvirt could not resume domain {name}: {e.get_error_message()}",
            hint="check libvirtd's log (/var/log/libvirt/qemu/)",
        ) from e


def destroy_domain(conn: Any, name: str, *, undefine: bool = True) -> bool:
    """Stop and remove a domain; True if something was there. Idempotent."""
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return False
    with contextlib.suppress(libvirt.libvirtError):
        if dom.isActive():
            dom.destroy()
    if undefine:
        with contextlib.suppress(libvirt.libvirtError):
            if dom.isPersistent():
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    # A transient domain lingers for a moment after destroy().
    end = time.monotonic() + DESTROY_GRACE_S
    while time.monotonic() < end:
        try:
            conn.lookupByName(name)
        except libvirt.libvirtError:
            return True
        if not undefine:
            return True
        time.sleep(0.1)
    return True


def destroy_network(conn: Any, name: str) -> bool:
    try:
        net = conn.networkLookupByName(name)
    except libvirt.libvirtError:
        return False
    with contextlib.suppress(libvirt.libvirtError):
        if net.isActive():
            net.destroy()
    with contextlib.suppress(libvirt.libvirtError):
        if net.isPersistent():
            net.undefine()
    return True


def leftovers(conn: Any, name_prefix: str) -> dict[str, list[str]]:
    """Domains and networks whose names start with ``name_prefix``."""
    doms = [d.name() for d in conn.listAllDomains(0) if d.name().startswith(name_prefix)]
    nets = [n.name() for n in conn.listAllNetworks(0) if n.name().startswith(name_prefix)]
    return {"domains": sorted(doms), "networks": sorted(nets)}


def domain_state(conn: Any, name: str) -> str:
    try:
        dom = conn.lookupByName(name)
    except libvirt.libvirtError:
        return "absent"
    st = dom.state()[0]
    return {
        libvirt.VIR_DOMAIN_RUNNING: "running",
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
        libvirt.VIR_DOMAIN_CRASHED: "crashed",
        libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    }.get(st, "other")


def agent_ping(conn: Any, name: str, timeout_s: int = 5) -> str | None:
    """None when the guest agent answers guest-ping, else why not."""
    import libvirt_qemu

    try:
        dom = conn.lookupByName(name)
        libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-ping"}', timeout_s, 0)
        return None
    except libvirt.libvirtError as e:
        return str(e.get_error_message())


def domain_macs(xml: str) -> list[str]:
    root = ET.fromstring(xml)
    return [m.get("address", "") for m in root.findall("./devices/interface/mac")]
