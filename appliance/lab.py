"""The built-in lab: a libvirt guest that looks like a VMware VM and keeps writing.

It is what ``scripts/demo`` migrates when there is no vCenter: the test guest "lab-web01"
(images/guests: the vmware-like Debian 12, root on /dev/sda1, no virtio drivers,
open-vm-tools, plus a unit that writes 1 MiB every 2 seconds into a 64 MiB ring of files, so
every sync has changes to carry). The guest runs as a TCG domain on SATA, exactly what
conversion must fix before it boots on virtio.

Everything the lab creates carries the ``ferryman-lab`` prefix, so ``reset`` removes exactly
that: domains, networks, overlays and the lab's rows, never anything else.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

from appliance.errors import FerrymanError

log = logging.getLogger(__name__)

PREFIX = "ferryman-lab"
DOMAIN = f"{PREFIX}-web01"
SOURCE = "lab"
PLAN = "lab"
ROOT = Path(__file__).resolve().parents[1]
BUILD_GUEST = ROOT / "images" / "guests" / "build"
GUEST = "lab-web01"  # the recipe in images/guests: vmware-like plus the writing workload
MEMORY_MIB = 768  # enough for Debian 12 with systemd; TCG guests are memory-light


class LabError(FerrymanError):
    code = "lab"


def lab_dir() -> Path:
    """The lab VM's disk and console log. libvirt's qemu user must reach it, so it is not
    under a private temporary directory."""
    return Path(os.environ.get("FERRYMAN_LAB_DIR", "/var/lib/ferryman-lab"))


def _run(argv: list[str], what: str, timeout: float = 1800) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise LabError(
            f"{what} failed: {(r.stderr or r.stdout).strip()[-300:]}",
            hint="see the output above; run scripts/demo again once fixed",
        )
    return r.stdout


def _build(*args: str, what: str) -> Path:
    out = _run([str(BUILD_GUEST), *args, GUEST], what).strip().splitlines()
    return Path(out[-1])


def image_path() -> Path:
    """Where the lab's image is, or will be once built (its build log: .log beside it)."""
    return _build("--path", what="looking up the lab image")


def vm_defined() -> bool:
    import libvirt

    conn = _conn()
    try:
        conn.lookupByName(DOMAIN)
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


def base_image() -> Path:
    """The lab's read-only base image, built on first use (images/guests: lab-web01)."""
    return _build(what="building the lab image")


def domain_xml(disk: Path, console_log: Path, domain_type: str) -> str:
    """The lab VM as VMware would run it: SATA disk, BIOS, no NIC (it needs none to write)."""
    from appliance.plans.virt import DomainSpec
    from appliance.plans.virt import domain_xml as xml

    spec = DomainSpec(
        name=DOMAIN,
        title="Ferryman lab: web01 (vmware-like, writes 1 MiB/2 s)",
        memory_mib=MEMORY_MIB,
        cpus=1,
        disks=[disk],
        console_log=console_log,
        domain_type=domain_type,
        disk_bus="sata",
        cache="none",
    )
    return xml(spec)


def _conn() -> Any:
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    return libvirt.open("qemu:///system")


def start_vm(domain_type: str = "qemu") -> dict[str, Any]:
    """Create the lab VM's disk (an overlay on the base) and start it, unless it runs."""
    import libvirt

    conn = _conn()
    try:
        try:
            dom = conn.lookupByName(DOMAIN)
            if dom.isActive():
                return {"domain": DOMAIN, "started": False}
            dom.create()
            return {"domain": DOMAIN, "started": True}
        except libvirt.libvirtError:
            pass
        base = base_image()
        d = lab_dir()
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        disk = d / "web01.qcow2"
        disk.unlink(missing_ok=True)
        _run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(disk)],
            "creating the lab disk",
        )
        dom = conn.defineXML(domain_xml(disk, d / "web01.console.log", domain_type))
        dom.create()
        return {"domain": DOMAIN, "started": True, "disk": str(disk)}
    finally:
        conn.close()


def console_log() -> Path:
    return lab_dir() / "web01.console.log"


def reset() -> list[str]:
    """Remove every domain and network whose name starts with the lab prefix, and the lab's
    disk. The caller removes the lab's source, plan and machine rows through the API."""
    import libvirt

    done: list[str] = []
    conn = _conn()
    try:
        for dom in conn.listAllDomains():
            # The lab VM, and the domains cutovers of it booted (fm-<store>-c<run>-<machine>).
            if dom.name().startswith(PREFIX) or (
                dom.name().startswith("fm-") and dom.name().endswith(f"-{DOMAIN}")
            ):
                name = dom.name()
                flags = getattr(libvirt, "VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA", 0) | getattr(
                    libvirt, "VIR_DOMAIN_UNDEFINE_NVRAM", 0
                )
                try:
                    if dom.isActive():
                        dom.destroy()
                    if dom.isPersistent():
                        dom.undefineFlags(flags)
                except libvirt.libvirtError as e:
                    # A test run's transient domain can vanish while we look (ferrymand
                    # cleans it up): gone is what we want.
                    if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                        raise
                done.append(f"domain {name}")
        for net in conn.listAllNetworks():
            if net.name().startswith(PREFIX):
                name = net.name()
                try:
                    if net.isActive():
                        net.destroy()
                    net.undefine()
                except libvirt.libvirtError as e:
                    if e.get_error_code() != libvirt.VIR_ERR_NO_NETWORK:
                        raise
                done.append(f"network {name}")
    finally:
        conn.close()
    d = lab_dir()
    if d.exists():
        for f in d.iterdir():
            f.unlink()
            done.append(f"file {f.name}")
        d.rmdir()
    return done
