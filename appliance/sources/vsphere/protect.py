"""Protect a VM: preflight (every blocker, with its reason), CBT, and Ferryman's snapshots.

Why each refusal:

- existing snapshots: the datastore reader reads the base ``-flat.vmdk``; with an operator's
  snapshot in the chain the base is older than the VM, and CBT answers relative to the
  running disk. Consolidate or delete them first.
- independent disks: a snapshot does not freeze them, so there is no consistent point to read.
- physical-mode RDMs: no snapshot, no CBT; the LUN is outside VMware's reach.
- storage the read path cannot reach: checked by reading the last byte of every disk through
  the very trust the reader will apply, so the first sync does not fail after a snapshot
  exists.

CBT enabled on a running VM takes effect only at the next stun/unstun: a snapshot create and
remove, which :func:`enable_cbt` does.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from appliance.sources.vsphere._vmomi import vim
from appliance.sources.vsphere.client import VSphereClient
from appliance.sources.vsphere.errors import (
    ChangeTrackingError,
    DatastoreReadError,
    PreflightRefused,
    SnapshotError,
    TaskFailed,
)
from appliance.sources.vsphere.inventory import VM_PATHS, VmDisk, disks_of, snapshot_names
from appliance.sources.vsphere.reader import check_readable, folder_url

log = logging.getLogger(__name__)

SNAPSHOT_PREFIX = "ferryman-"  # every snapshot Ferryman creates starts with this


@dataclass
class PreflightReport:
    vm: str  # MoRef
    name: str
    reasons: list[str] = field(default_factory=list)  # blockers: protect is refused
    warnings: list[str] = field(default_factory=list)  # what the operator should know
    disks: list[VmDisk] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.reasons

    def raise_if_refused(self) -> None:
        if self.reasons:
            raise PreflightRefused(f"{self.name} ({self.vm})", self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "name": self.name,
            "ok": self.ok,
            "reasons": self.reasons,
            "warnings": self.warnings,
            "disks": [d.info().key for d in self.disks],
        }


def disk_url(client: VSphereClient, datacenter: str, disk: VmDisk) -> str:
    ep = client.endpoint
    return folder_url(ep.host, ep.port, datacenter, disk.datastore, disk.flat_path)


def disk_blockers(disks: list[VmDisk]) -> list[str]:
    """The reasons, one per disk, why these disks cannot be replicated."""
    reasons = []
    for d in disks:
        if d.backing == "rdm-physical":
            reasons.append(
                f"disk {d.key} ({d.file}) is a physical-mode RDM: no snapshot or CBT; "
                "migrate the LUN separately or convert it to a virtual disk"
            )
        elif d.independent:
            reasons.append(
                f"disk {d.key} ({d.file}) is {d.mode}: snapshots do not freeze it; set it to "
                "dependent (persistent) mode while the VM is powered off"
            )
        elif d.backing not in ("flat", "rdm-virtual"):
            reasons.append(
                f"disk {d.key} ({d.file}) has a {d.backing} backing the datastore reader cannot "
                "read; use the VDDK reader"
            )
    return reasons


def preflight(client: VSphereClient, vm: Any, *, check_read: bool = True) -> PreflightReport:
    """Everything that would stop replication of ``vm``; refuses nothing by itself."""
    p = client.props(vm, [*VM_PATHS, "datastore"])
    rep = PreflightReport(vm=vm._moId, name=p.get("name", vm._moId))
    rep.disks = disks_of(list(p.get("config.hardware.device") or []))
    if p.get("config.template"):
        rep.reasons.append("it is a template (deploy a VM from it and protect that)")
    foreign = [n for n in snapshot_names(p.get("snapshot")) if not n.startswith(SNAPSHOT_PREFIX)]
    if foreign:
        rep.reasons.append(
            f"it has {len(foreign)} snapshot(s) ({', '.join(foreign)}): delete or consolidate "
            "them in vSphere"
        )
    if not rep.disks:
        rep.reasons.append("it has no virtual disks")
    rep.reasons += disk_blockers(rep.disks)
    ds_list = list(p.get("datastore") or [])
    accessible = {
        dp.get("name", ""): dp.get("summary.accessible", False)
        for _, dp in client.retrieve(vim.Datastore, ["name", "summary.accessible"], ds_list)
    }
    for name, ok in accessible.items():
        if not ok:
            rep.reasons.append(f"datastore {name} is not accessible from its host")
    if p.get("guest.toolsRunningStatus") != "guestToolsRunning":
        rep.warnings.append(
            "VMware Tools are not running: snapshots will be crash-consistent, not quiesced"
        )
    if not p.get("config.changeTrackingEnabled"):
        rep.warnings.append("CBT is off: protect enables it (one snapshot create/remove)")
    if check_read and rep.ok:
        datacenter = client.datacenter_of(vm)
        cookie = client.session_cookie()
        ctx = client.data_context()
        for d in rep.disks:
            try:
                check_readable(disk_url(client, datacenter, d), cookie, ctx, d.size)
            except DatastoreReadError as e:
                rep.reasons.append(f"disk {d.key} ({d.file}) cannot be read: {e}")
    return rep


def create_snapshot(client: VSphereClient, vm: Any, name: str, *, quiesce: bool) -> Any:
    task = vm.CreateSnapshot_Task(
        name=name,
        description="Ferryman replication; removed automatically",
        memory=False,
        quiesce=quiesce,
    )
    try:
        return client.wait(task, f"{'quiesced ' if quiesce else ''}snapshot of {vm._moId}")
    except TaskFailed as e:
        err = SnapshotError(
            e.message,
            hint="check free space on the VM's datastore and the VM's events in vSphere"
            + ("; quiescing needs working VMware Tools (and VSS on Windows)" if quiesce else ""),
        )
        err.fault = e.fault
        raise err from e


def remove_snapshot(client: VSphereClient, snapshot: Any, what: str) -> None:
    try:
        task = snapshot.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
        client.wait(task, f"removing snapshot of {what}")
    except TaskFailed as e:
        raise SnapshotError(
            f"{what}: could not remove snapshot {snapshot._moId}: {e.message}",
            hint="delete the ferryman-* snapshot in vSphere (Snapshot Manager), then consolidate",
        ) from e


def ferryman_snapshots(client: VSphereClient, vm: Any) -> list[tuple[str, Any]]:
    tree = client.props(vm, ["snapshot"]).get("snapshot")
    out: list[tuple[str, Any]] = []
    stack = list(tree.rootSnapshotList) if tree is not None else []
    while stack:
        node = stack.pop()
        if node.name.startswith(SNAPSHOT_PREFIX):
            out.append((node.name, node.snapshot))
        stack.extend(node.childSnapshotList or [])
    return out


def enable_cbt(client: VSphereClient, vm: Any) -> list[str]:
    """Turn CBT on and make it take effect. Returns the events (empty when nothing to do)."""
    p = client.props(
        vm, ["name", "config.changeTrackingEnabled", "runtime.powerState", "config.hardware.device"]
    )
    name = p.get("name", vm._moId)
    disks = disks_of(list(p.get("config.hardware.device") or []))
    enabled = bool(p.get("config.changeTrackingEnabled"))
    if enabled and disks and all(d.change_id for d in disks):
        return []
    events: list[str] = []
    if not enabled:
        try:
            client.wait(
                vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=True)),
                f"enabling CBT on {name}",
            )
        except TaskFailed as e:
            raise ChangeTrackingError(
                f"{name}: could not enable CBT: {e.message}",
                hint="the account needs VirtualMachine.Config.Settings; VM hardware version 7+",
            ) from e
        events.append(f"CBT enabled on {name}")
    if p.get("runtime.powerState") == "poweredOn":
        snap = create_snapshot(
            client, vm, f"{SNAPSHOT_PREFIX}cbt-{int(time.time())}", quiesce=False
        )
        remove_snapshot(client, snap, name)
        events.append(f"CBT activated on running {name} (snapshot created and removed)")
    else:
        events.append(f"CBT on {name} takes effect at its next power-on or first sync")
    log.info("%s", "; ".join(events))
    return events
