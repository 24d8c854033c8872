"""Discovery: every VM of a vCenter/ESXi with what migration planning needs.

One property-collector round trip for all VMs (a container view), not one call per VM and
property: a vCenter with thousands of VMs answers in seconds this way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from appliance.sources.base import DiskInfo, MachineInfo
from appliance.sources.vsphere._vmomi import vim
from appliance.sources.vsphere.client import VSphereClient

VM_PATHS = [
    "name",
    "runtime.powerState",
    "config.guestFullName",
    "config.guestId",
    "config.hardware.numCPU",
    "config.hardware.memoryMB",
    "config.hardware.device",
    "config.firmware",
    "config.instanceUuid",
    "config.uuid",
    "config.template",
    "config.changeTrackingEnabled",
    "guest.toolsRunningStatus",
    "guest.toolsVersionStatus2",
    "guest.hostName",
    "guest.net",
    "snapshot",
    "runtime.host",
]

POWER = {"poweredOn": "running", "poweredOff": "stopped", "suspended": "paused"}


@dataclass(frozen=True)
class VmDisk:
    """One virtual disk as Ferryman needs it."""

    key: int
    size: int
    file: str  # "[datastore] dir/name.vmdk" (the descriptor)
    datastore: str
    mode: str  # persistent, independent_persistent, independent_nonpersistent, ...
    backing: str  # flat | rdm-physical | rdm-virtual | sparse | other:<type>
    change_id: str
    controller: str
    thin: bool

    @property
    def flat_path(self) -> str:
        """The path inside the datastore of the data file: 'dir/name-flat.vmdk'."""
        path = self.file.split("] ", 1)[-1]
        return re.sub(r"\.vmdk$", "-flat.vmdk", path)

    @property
    def independent(self) -> bool:
        return self.mode.startswith("independent")

    def info(self) -> DiskInfo:
        return DiskInfo(
            key=str(self.key),
            size=self.size,
            label=self.file,
            details={
                "datastore": self.datastore,
                "mode": self.mode,
                "backing": self.backing,
                "thin": self.thin,
                "controller": self.controller,
                "change_id": self.change_id,
            },
        )


def _datastore_of(path: str) -> str:
    m = re.match(r"\[([^\]]*)\]", path)
    return m.group(1) if m else ""


def disks_of(devices: list[Any]) -> list[VmDisk]:
    labels = {
        d.key: f"{type(d).__name__.rsplit('.', 1)[-1]} {getattr(d, 'busNumber', '')}".strip()
        for d in devices
        if isinstance(d, vim.vm.device.VirtualController)
    }
    out = []
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        b = d.backing
        size = int(d.capacityInBytes or 0) or int(d.capacityInKB or 0) * 1024
        mode = getattr(b, "diskMode", "") or ""
        thin = bool(getattr(b, "thinProvisioned", False))
        if isinstance(b, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo):
            kind = "rdm-physical" if b.compatibilityMode == "physicalMode" else "rdm-virtual"
        elif isinstance(b, vim.vm.device.VirtualDisk.FlatVer2BackingInfo):
            kind = "flat"
        elif isinstance(
            b,
            vim.vm.device.VirtualDisk.SeSparseBackingInfo
            | vim.vm.device.VirtualDisk.SparseVer2BackingInfo,
        ):
            kind = "sparse"
        else:
            kind = "other:" + type(b).__name__.rsplit(".", 1)[-1]
        file = getattr(b, "fileName", "") or ""
        out.append(
            VmDisk(
                key=int(d.key),
                size=size,
                file=file,
                datastore=_datastore_of(file),
                mode=mode,
                backing=kind,
                change_id=getattr(b, "changeId", "") or "",
                controller=labels.get(d.controllerKey, ""),
                thin=thin,
            )
        )
    return out


def nics_of(devices: list[Any]) -> list[dict[str, Any]]:
    out = []
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualEthernetCard):
            continue
        b = d.backing
        network = getattr(b, "deviceName", "") or ""
        if isinstance(b, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
            network = f"dvportgroup:{b.port.portgroupKey}"
        out.append(
            {
                "key": int(d.key),
                "model": type(d).__name__.rsplit(".", 1)[-1].removeprefix("Virtual").lower(),
                "mac": d.macAddress or "",
                "network": network,
                "connected": bool(d.connectable and d.connectable.connected),
            }
        )
    return out


def snapshot_names(tree: Any) -> list[str]:
    """Names of every snapshot in a ``vm.snapshot`` value (``None`` when there are none)."""
    names: list[str] = []
    stack = list(tree.rootSnapshotList) if tree is not None else []
    while stack:
        node = stack.pop()
        names.append(node.name)
        stack.extend(node.childSnapshotList or [])
    return names


def guest_ips(net: Any) -> dict[str, list[str]]:
    """MAC -> IP addresses the guest reports through Tools (for plans: keep or re-address)."""
    out: dict[str, list[str]] = {}
    for n in net or []:
        ips = [a.ipAddress for a in (n.ipConfig.ipAddress if n.ipConfig else [])]
        ips = ips or list(n.ipAddress or [])
        if n.macAddress and ips:
            out[n.macAddress] = ips
    return out


def machine_from(vm: Any, p: dict[str, Any]) -> MachineInfo:
    devices = list(p.get("config.hardware.device") or [])
    disks = disks_of(devices)
    return MachineInfo(
        ref=vm._moId,
        name=p.get("name", vm._moId),
        power_state=POWER.get(p.get("runtime.powerState", ""), "unknown"),
        disks=[d.info() for d in disks],
        guest_os=p.get("config.guestFullName") or p.get("config.guestId") or "",
        cpus=int(p.get("config.hardware.numCPU") or 0),
        memory_mib=int(p.get("config.hardware.memoryMB") or 0),
        firmware=p.get("config.firmware") or "bios",
        nics=nics_of(devices),
        details={
            "instance_uuid": p.get("config.instanceUuid", ""),
            "bios_uuid": p.get("config.uuid", ""),
            "guest_id": p.get("config.guestId", ""),
            "cbt": bool(p.get("config.changeTrackingEnabled")),
            "tools": p.get("guest.toolsRunningStatus", ""),
            "tools_version": p.get("guest.toolsVersionStatus2", ""),
            "snapshots": snapshot_names(p.get("snapshot")),
            "guest_hostname": p.get("guest.hostName", ""),
            "ip_addresses": guest_ips(p.get("guest.net")),
            "host": p["runtime.host"]._moId if p.get("runtime.host") is not None else "",
        },
    )


def discover(client: VSphereClient) -> list[MachineInfo]:
    """All VMs (templates excluded), sorted by name."""
    machines = [
        machine_from(vm, p)
        for vm, p in client.retrieve(vim.VirtualMachine, VM_PATHS)
        if not p.get("config.template")
    ]
    return sorted(machines, key=lambda m: (m.name, m.ref))
