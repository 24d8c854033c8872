"""The vSphere source adapter: the SourceAdapter / SyncSession / DiskExport of sources/base.py.

One sync, in order (design.md, data path):

1. log in; remove ``ferryman-*`` snapshots an interrupted sync left behind (an event each);
   preflight (refuses with every reason); CBT on (``protect`` turns it on; a sync finding it
   off turns it on itself, with an event, and copies in full).
2. a quiesced snapshot when VMware Tools run, else (or when quiescing fails) a
   crash-consistent one, with an event saying why.
3. per disk, from the snapshot's own device list: compare with the previous token. Disk
   resized, CBT epoch changed (CBT reset), changeId refused by vSphere, or a disk new since
   the last sync -> full copy of that disk, with the reason. Otherwise QueryChangedDiskAreas
   paged from the stored changeId; the first sync pages with ``*`` (allocated areas; the
   holes become zero extents).
4. per disk an nbdkit export of the frozen base disk (datastore HTTPS or VDDK).
5. the engine copies, flushes and seals, THEN persists :meth:`VSphereSyncSession.token` (the
   snapshot's changeIds), THEN calls :meth:`~VSphereSyncSession.release`, which stops the
   exports, removes the snapshot and logs out. A token is never taken from a live VM, only
   from the snapshot that was copied.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.sources.base import (
    Consistency,
    DiskExport,
    DiskInfo,
    Extent,
    MachineInfo,
    SourceAdapter,
)
from appliance.sources.vsphere import inventory, power, protect, reader
from appliance.sources.vsphere._vmomi import vim, vmodl
from appliance.sources.vsphere.client import Endpoint, PasswordSource, Secret, VSphereClient
from appliance.sources.vsphere.errors import ChangeTrackingError, SnapshotError, VSphereError
from appliance.sources.vsphere.inventory import VmDisk, disks_of

log = logging.getLogger(__name__)

TOKEN_VERSION = 1
# vCenter ends idle sessions after 30 min by default; whether datastore reads count as activity
# is not documented, so a copy keeps the SOAP session busy itself.
KEEPALIVE = 300.0  # seconds
WATCH = 1.0  # seconds between checks that every reader still runs


@dataclass
class ProtectResult:
    report: protect.PreflightReport
    events: list[str]


@dataclass
class VSphereDiskExport:
    disk: DiskInfo
    nbd_uri: str
    mode: str  # "full" | "dirty"
    areas: list[tuple[int, int]]  # data ranges, ascending, non-overlapping
    export: reader.NbdkitExport
    reason: str = ""  # why full, for this disk

    def extents(self) -> Iterator[Extent]:
        if self.mode == "dirty":
            for off, length in self.areas:
                yield Extent(off, length, zero=False)
            return
        pos = 0
        for off, length in self.areas:
            if off > pos:
                yield Extent(pos, off - pos, zero=True)
            yield Extent(off, length, zero=False)
            pos = off + length
        if pos < self.disk.size:
            yield Extent(pos, self.disk.size - pos, zero=True)

    @property
    def notes(self) -> list[str]:
        """Shown with the disk's sync result (appliance/replication.py reads ``notes``)."""
        return [self.reason] if self.reason else []

    @property
    def data_bytes(self) -> int:
        """Bytes this disk's sync reads: the progress total before any zero detection."""
        return sum(length for _, length in self.areas)


@dataclass
class VSphereSyncSession:
    snapshot_id: str
    consistency: Consistency
    disks: list[DiskExport]  # the VSphereDiskExports below, as the engine sees them
    full: bool
    reason: str
    events: list[str] = field(default_factory=list)
    vm_ref: str = ""
    vm_name: str = ""
    instance_uuid: str = ""
    _client: VSphereClient | None = None
    _snapshot: Any = None
    _disk_state: dict[str, dict[str, Any]] = field(default_factory=dict)
    _exports: list[VSphereDiskExport] = field(default_factory=list)
    _stop_keepalive: threading.Event = field(default_factory=threading.Event)
    _keepalive: threading.Thread | None = None

    def start_keepalive(self, interval: float = KEEPALIVE) -> None:
        """One watch thread per session: restarts a reader that died (the copier reconnects
        to the same socket) and keeps the vSphere session, whose cookie the readers use, from
        idling out mid-copy."""
        client = self._client
        if client is None or self._keepalive is not None:
            return

        def run() -> None:
            last = time.monotonic()
            while not self._stop_keepalive.wait(min(WATCH, interval)):
                for d in self._exports:
                    try:
                        if d.export.restart_if_dead():
                            self.events.append(
                                f"disk {d.disk.key}: reader restarted after it exited"
                            )
                    except VSphereError as e:
                        log.warning("%s: %s", self.vm_name, e)
                if time.monotonic() - last >= interval:
                    last = time.monotonic()
                    try:
                        client.keepalive()
                    except Exception as e:  # a dead session shows up as read errors
                        log.warning("%s: session keep-alive failed: %s", self.vm_name, e)

        self._keepalive = threading.Thread(target=run, name=f"vsphere-watch-{self.vm_ref}")
        self._keepalive.daemon = True
        self._keepalive.start()

    def token(self) -> dict[str, Any]:
        """The changeIds of the snapshot that was copied. Persist only after sealing."""
        return {
            "version": TOKEN_VERSION,
            "source": "vsphere",
            "vm": self.vm_ref,
            "instance_uuid": self.instance_uuid,
            "snapshot": self.snapshot_id,
            "disks": self._disk_state,
        }

    def release(self) -> None:
        """Stop the exports, remove the snapshot, log out. Idempotent; always call it."""
        errors: list[VSphereError] = []
        self._stop_keepalive.set()
        if self._keepalive is not None:
            self._keepalive.join()
            self._keepalive = None
        for d in self._exports:
            d.export.close()
        client, self._client = self._client, None
        snap, self._snapshot = self._snapshot, None
        if client is None:
            return
        try:
            if snap is not None:
                try:
                    protect.remove_snapshot(client, snap, f"{self.vm_name} ({self.vm_ref})")
                    log.info("%s: snapshot %s removed", self.vm_name, self.snapshot_id)
                except VSphereError as e:
                    errors.append(e)
        finally:
            client.close()
        if errors:
            raise errors[0]

    abort = release


def _epoch(change_id: str) -> str:
    return change_id.rsplit("/", 1)[0]


def _merge(areas: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, length in sorted(areas):
        end = min(start + length, size)
        if end <= start:
            continue
        if out and start <= out[-1][0] + out[-1][1]:
            s0, l0 = out[-1]
            out[-1] = (s0, max(s0 + l0, end) - s0)
        else:
            out.append((start, end - start))
    return out


def changed_areas(vm: Any, snapshot: Any, disk: VmDisk, change_id: str) -> list[tuple[int, int]]:
    """QueryChangedDiskAreas paged over the whole disk: each reply covers [startOffset,
    startOffset+length); the next query starts where it ended."""
    areas: list[tuple[int, int]] = []
    offset = 0
    while offset < disk.size:
        info = vm.QueryChangedDiskAreas(
            snapshot=snapshot, deviceKey=disk.key, startOffset=offset, changeId=change_id
        )
        areas.extend((int(a.start), int(a.length)) for a in info.changedArea or [])
        nxt = int(info.startOffset) + int(info.length)
        if nxt <= offset:
            raise ChangeTrackingError(
                f"disk {disk.key}: QueryChangedDiskAreas made no progress at offset {offset}",
                hint="reset CBT on the VM (disable, enable, snapshot) and sync again",
            )
        offset = nxt
    return _merge(areas, disk.size)


class VSphereSource:
    """A registered vCenter/ESXi. Cheap to build; every operation opens its own session."""

    kind = "vsphere"

    def __init__(
        self,
        endpoint: Endpoint,
        password: PasswordSource,
        *,
        run_dir: Path | None = None,
        vddk_libdir: str | None = None,
        reader_filters: list[str] | None = None,
        keepalive: float = KEEPALIVE,
    ) -> None:
        self.endpoint = endpoint
        self._password = password
        self.run_dir = run_dir
        self.vddk_libdir = vddk_libdir
        # Extra nbdkit filters in front of the datastore reader (tests inject faults here).
        self.reader_filters = reader_filters or []
        self.keepalive = keepalive

    def client(self) -> VSphereClient:
        return VSphereClient(self.endpoint, self._password).connect()

    def test(self) -> None:
        with self.client():
            pass

    def about(self) -> dict[str, str]:
        """Product, API version and instance UUID of the endpoint, for registration output."""
        with self.client() as c:
            return {**c.about, "tls": self.endpoint.tls.mode}

    def discover(self) -> list[MachineInfo]:
        with self.client() as c:
            return inventory.discover(c)

    def preflight(self, machine_ref: str) -> protect.PreflightReport:
        with self.client() as c:
            return protect.preflight(c, c.find_vm(machine_ref))

    def protect(self, machine_ref: str) -> ProtectResult:
        """Preflight (raises PreflightRefused with every reason), then enable CBT."""
        with self.client() as c:
            vm = c.find_vm(machine_ref)
            report = protect.preflight(c, vm)
            report.raise_if_refused()
            return ProtectResult(report, protect.enable_cbt(c, vm))

    def stop_machine(
        self, machine_ref: str, timeout: float = power.SHUTDOWN_TIMEOUT
    ) -> power.PowerResult:
        with self.client() as c:
            return power.stop(c, c.find_vm(machine_ref), timeout=timeout)

    def start_machine(self, machine_ref: str) -> power.PowerResult:
        with self.client() as c:
            return power.start(c, c.find_vm(machine_ref))

    # -- sync ------------------------------------------------------------------------------

    def open_session(
        self, machine_ref: str, previous_token: dict[str, Any] | None
    ) -> VSphereSyncSession:
        if self.vddk_libdir and not reader.vddk_available(self.vddk_libdir):
            raise VSphereError(
                f"VDDK reader configured but not usable: no libvixDiskLib under "
                f"{self.vddk_libdir}/lib64 or no nbdkit vddk plugin",
                hint="install VMware's VDDK there and nbdkit's vddk plugin (docs/vsphere.md), "
                "or remove vddk_libdir to read over datastore HTTPS",
            )
        client = self.client()
        snap: Any = None
        exports: list[VSphereDiskExport] = []
        try:
            vm = client.find_vm(machine_ref)
            events: list[str] = []
            for name, stale in protect.ferryman_snapshots(client, vm):
                protect.remove_snapshot(client, stale, machine_ref)
                events.append(f"removed snapshot {name} left by an interrupted sync")
            report = protect.preflight(client, vm)
            report.raise_if_refused()
            p = client.props(
                vm,
                [
                    "name",
                    "config.instanceUuid",
                    "config.changeTrackingEnabled",
                    "guest.toolsRunningStatus",
                    "runtime.powerState",
                ],
            )
            name = p.get("name", machine_ref)
            if not p.get("config.changeTrackingEnabled"):
                # Not protected through protect(), or someone turned CBT off: the preflight
                # passed, so turning it on here is what protect would do.
                events += protect.enable_cbt(client, vm)
                previous_token = None
            first = "first sync (or a full copy was asked for)"
            if previous_token and previous_token.get("instance_uuid") not in (
                None,
                p.get("config.instanceUuid"),
            ):
                first = "the VM's instance UUID changed since the last sync (another VM?)"
                previous_token = None
            snap, consistency = self._snapshot(client, vm, name, p, events)
            snap_disks = disks_of(
                list(client.props(snap, ["config.hardware.device"])["config.hardware.device"])
            )
            datacenter = client.datacenter_of(vm)
            cookie = client.session_cookie()
            reasons: list[str] = []
            state: dict[str, dict[str, Any]] = {}
            for d in snap_disks:
                mode, areas, why = self._plan(vm, snap, d, previous_token, first)
                if why:
                    reasons.append(why)
                export = self._export(client, vm, snap, d, datacenter, cookie)
                exports.append(
                    VSphereDiskExport(
                        disk=d.info(),
                        nbd_uri=export.uri,
                        mode=mode,
                        areas=areas,
                        export=export,
                        reason=why,
                    )
                )
                export.start()
                state[str(d.key)] = {"change_id": d.change_id, "size": d.size, "file": d.file}
            full = any(e.mode == "full" for e in exports)
            session = VSphereSyncSession(
                snapshot_id=snap._moId,
                consistency=consistency,
                disks=list(exports),
                full=full,
                reason="; ".join(reasons),
                events=events,
                vm_ref=vm._moId,
                vm_name=name,
                instance_uuid=p.get("config.instanceUuid", ""),
                _client=client,
                _snapshot=snap,
                _disk_state=state,
                _exports=exports,
            )
            for ev in events:
                log.info("%s: %s", name, ev)
            session.start_keepalive(self.keepalive)
            return session
        except BaseException:
            for e in exports:
                e.export.close()
            if snap is not None:
                with contextlib.suppress(VSphereError):
                    protect.remove_snapshot(client, snap, machine_ref)
            client.close()
            raise

    def _snapshot(
        self, client: VSphereClient, vm: Any, name: str, p: dict[str, Any], events: list[str]
    ) -> tuple[Any, Consistency]:
        snap_name = (
            f"{protect.SNAPSHOT_PREFIX}sync-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        )
        running = p.get("runtime.powerState") == "poweredOn"
        if running and p.get("guest.toolsRunningStatus") == "guestToolsRunning":
            try:
                snap = protect.create_snapshot(client, vm, snap_name, quiesce=True)
                return snap, Consistency.QUIESCED
            except SnapshotError as e:
                events.append(
                    f"quiesced snapshot failed ({e.message}); fell back to crash-consistent"
                )
        elif running:
            events.append("VMware Tools not running: crash-consistent snapshot (not quiesced)")
        else:
            events.append("VM is powered off: its disks are at rest (cutover's last delta)")
        snap = protect.create_snapshot(client, vm, snap_name, quiesce=False)
        # A powered-off VM's disks are consistent as they are.
        return snap, Consistency.CRASH_CONSISTENT if running else Consistency.QUIESCED

    def _plan(
        self,
        vm: Any,
        snap: Any,
        d: VmDisk,
        previous: dict[str, Any] | None,
        first: str = "first sync (or a full copy was asked for)",
    ) -> tuple[str, list[tuple[int, int]], str]:
        """(mode, data areas, reason when full) for one disk of the snapshot."""
        prev = ((previous or {}).get("disks") or {}).get(str(d.key))
        why = ""
        if previous is None:
            why = f"disk {d.key}: {first}"
        elif prev is None:
            why = f"disk {d.key}: new since the last sync"
        elif int(prev.get("size", -1)) != d.size:
            why = f"disk {d.key}: resized from {prev.get('size')} to {d.size} bytes"
        elif not d.change_id:
            why = f"disk {d.key}: no changeId on the snapshot (CBT not active)"
        elif not prev.get("change_id") or _epoch(prev["change_id"]) != _epoch(d.change_id):
            why = f"disk {d.key}: CBT was reset since the last sync (changeId epoch changed)"
        else:
            try:
                return "dirty", changed_areas(vm, snap, d, prev["change_id"]), ""
            except (vim.fault.FileFault, vmodl.fault.InvalidArgument) as e:
                why = (
                    f"disk {d.key}: vSphere refused the stored changeId "
                    f"({type(e).__name__.rsplit('.', 1)[-1]}: {getattr(e, 'msg', '')})"
                )
        log.warning("%s: full copy: %s", vm._moId, why)
        if d.change_id:
            try:
                return "full", changed_areas(vm, snap, d, "*"), why
            except (vim.fault.FileFault, vmodl.fault.InvalidArgument) as e:
                why += f"; allocation query failed ({getattr(e, 'msg', '')}), reading all"
        return "full", [(0, d.size)], why

    def _export(
        self,
        client: VSphereClient,
        vm: Any,
        snap: Any,
        d: VmDisk,
        datacenter: str,
        cookie: Secret,
    ) -> reader.NbdkitExport:
        label = f"{vm._moId}-{d.key}"
        if self.vddk_libdir:
            ep = self.endpoint
            der = _verified_der(client)
            password = self._password() if callable(self._password) else self._password
            return reader.vddk_export(
                label=label,
                libdir=self.vddk_libdir,
                server=ep.host,
                user=ep.user,
                password=password,
                thumbprint=reader.sha1_thumbprint(der),
                vm_moref=vm._moId,
                snapshot_moref=snap._moId,
                file=d.file,
                size=d.size,
                run_dir=self.run_dir,
            )
        return reader.datastore_export(
            label=label,
            url=protect.disk_url(client, datacenter, d),
            size=d.size,
            cookie=cookie,
            policy=self.endpoint.tls,
            run_dir=self.run_dir,
            filters=self.reader_filters,
        )


def _verified_der(client: VSphereClient) -> bytes:
    """The server certificate as verified by this session's trust policy (for VDDK)."""
    pem = client.verified_certificate_pem()
    if pem:
        return ssl.PEM_cert_to_DER_cert(pem)
    ep = client.endpoint
    ctx = client.data_context()
    with (
        socket.create_connection((ep.host, ep.port), timeout=30) as raw,
        ctx.wrap_socket(raw, server_hostname=ep.host) as s,
    ):
        return s.getpeercert(binary_form=True) or b""


def _conforms(source: VSphereSource) -> SourceAdapter:
    """mypy proves here that VSphereSource speaks sources/base.py's interface."""
    return source
