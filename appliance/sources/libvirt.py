"""KVM/libvirt source: pull-mode backups with checkpoints (local or qemu+ssh:// hosts).

One sync = one ``backupBegin`` in pull mode, which freezes every disk at one instant and
serves it over NBD on a unix socket, together with a new checkpoint (a persistent dirty
bitmap in each qcow2). The next sync asks for an incremental backup from that checkpoint and
reads ``qemu:dirty-bitmap:backup-<target>`` intersected with ``base:allocation``.

Checkpoint hygiene: at the start of a session every ferryman checkpoint except the one the
last committed token names is deleted (libvirt merges their bitmaps into the parent), so a
failed sync never leaves bitmaps piling up in the guest's images, and the token's checkpoint
stays usable until a newer token is committed.

Remote hosts (``qemu+ssh://``): the backup socket and scratch files live on the KVM host in
``remote_dir``; the data path reaches the socket through an ssh tunnel
(``appliance/sources/libvirt_remote.py``) and every export's ``nbd_uri`` names the tunnel's
local socket.

Quiesce: when the guest agent answers, the filesystems are frozen around ``backupBegin`` and
the point is ``quiesced``; otherwise it is crash-consistent and the session's ``notes`` say
why (the engine turns them into an event).

When the checkpoint is gone (libvirt lost its metadata, the VM was redefined), the disk set
changed, or qemu refuses the incremental (bitmap missing or inconsistent), the session falls
back to a full copy and says why. The backup job is always ended: ``release()`` aborts it,
and any failure inside ``open_session`` aborts it before raising.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import nbd

from appliance.datapath import extents as ex
from appliance.datapath.copier import connect
from appliance.errors import FerrymanError
from appliance.sources.base import Consistency, DiskInfo, Extent, MachineInfo
from appliance.sources.libvirt_remote import RemoteHost, Tunnel, is_remote

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "ferryman-"
REMOTE_DIR = "/var/tmp/ferryman-backup"  # on a qemu+ssh:// host: backup sockets, scratch
FREEZE_TIMEOUT_S = 10  # guest agent: fsfreeze must answer quickly or we go crash-consistent
BITMAP_CONTEXT = "qemu:dirty-bitmap:backup-{target}"

libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # never print to the terminal


class LibvirtSourceError(FerrymanError):
    code = "libvirt_source"


def _wrap(what: str, e: libvirt.libvirtError, hint: str) -> LibvirtSourceError:
    return LibvirtSourceError(f"{what}: {e.get_error_message()}", hint=hint)


@dataclass
class LibvirtDiskExport:
    disk: DiskInfo
    nbd_uri: str
    mode: str  # "full" | "dirty"
    target: str = ""
    notes: list[str] = field(default_factory=list)

    def extents(self) -> Iterator[Extent]:
        ctx = BITMAP_CONTEXT.format(target=self.target)
        contexts = [ex.BASE_ALLOCATION] + ([ctx] if self.mode == "dirty" else [])
        try:
            h = connect(self.nbd_uri, name=f"bs-{self.target}", contexts=contexts)
            exts, note = ex.query_extents(
                h, h.get_size(), dirty_context=ctx if self.mode == "dirty" else None
            )
        except (nbd.Error, ValueError) as e:
            raise LibvirtSourceError(
                f"disk {self.target}: reading block status of the backup export failed: {e}",
                hint="the backup job may have ended; sync again",
            ) from e
        if note:
            self.notes.append(note)
        yield from exts


@dataclass
class LibvirtSession:
    snapshot_id: str  # the new checkpoint's name: unique per frozen state
    disks: list[LibvirtDiskExport]  # type: ignore[assignment]
    full: bool
    reason: str
    consistency: Consistency
    dom: Any
    socket: Path
    scratch: list[Path]
    checkpoint: str
    notes: list[str] = field(default_factory=list)  # the engine records each as an event
    remote: RemoteHost | None = None
    tunnel: Tunnel | None = None
    _released: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def token(self) -> dict[str, Any]:
        return {
            "kind": "libvirt",
            "checkpoint": self.checkpoint,
            "consistency": self.consistency.value,
            "disks": {d.disk.key: {"size": d.disk.size} for d in self.disks},
        }

    def release(self) -> None:
        """End the backup job (the checkpoint stays for the next incremental)."""
        with self._lock:
            if self._released:
                return
            self._released = True
        try:
            _abort_backup(self.dom)
        finally:
            if self.tunnel is not None:
                self.tunnel.close()
            if self.remote is not None:
                try:
                    self.remote.remove(self.scratch)
                except FerrymanError as e:
                    log.warning("removing scratch files on %s: %s", self.remote.host, e)
            else:
                for p in self.scratch:
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()


ABORT_WAIT_S = 30.0  # abortJob returns before qemu has torn the NBD export down


def _abort_backup(dom: Any) -> None:
    """End the backup job and wait until libvirt reports no job (a new backupBegin would
    otherwise be refused as 'another job is running')."""
    try:
        if dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
            return
        dom.abortJob()
    except libvirt.libvirtError as e:
        msg = e.get_error_message() or ""
        if "no job" not in msg.lower() and "not active" not in msg.lower():
            log.warning("ending the backup job of %s failed: %s", dom.name(), msg)
    end = time.monotonic() + ABORT_WAIT_S
    while time.monotonic() < end:
        try:
            if dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                return
        except libvirt.libvirtError:
            return
        time.sleep(0.1)
    log.warning("the backup job of %s did not end within %.0fs", dom.name(), ABORT_WAIT_S)


def _text(el: ET.Element | None, default: str = "") -> str:
    return el.text or default if el is not None else default


class LibvirtSource:
    kind = "libvirt"

    def __init__(
        self,
        uri: str = "qemu:///system",
        *,
        run_dir: Path,
        scratch_dir: Path | None = None,
        quiesce: bool | str = True,
        remote_dir: str = REMOTE_DIR,
        **_ignored: Any,
    ) -> None:
        self.uri = uri
        self.run_dir = Path(run_dir)
        self.scratch_dir = Path(scratch_dir) if scratch_dir else self.run_dir
        self.quiesce = quiesce not in (False, "0", "false", "no")  # --param quiesce=no
        # A remote host: sockets and scratch files live there, the data goes through ssh.
        # (qemu+tcp:// and +tls:// still discover; open_session refuses them.)
        self.remote = RemoteHost(uri) if is_remote(uri) and "+ssh" in uri.split(":")[0] else None
        self.remote_dir = Path(remote_dir)
        self._conn: Any = None

    # -- connection ----------------------------------------------------------------------

    def conn(self) -> Any:
        if self._conn is None or not self._conn.isAlive():
            try:
                self._conn = libvirt.open(self.uri)
            except libvirt.libvirtError as e:
                raise _wrap(
                    f"cannot connect to libvirt at {self.uri}",
                    e,
                    "check that libvirtd runs there; for qemu+ssh:// that the "
                    "appliance's key is authorised",
                ) from e
        return self._conn

    def test(self) -> None:
        c = self.conn()
        ver = c.getLibVersion()
        if ver < 7_002_000:
            raise LibvirtSourceError(
                f"libvirt at {self.uri} is version {ver}; pull-mode backups need 7.2 or newer",
                hint="upgrade libvirt on the KVM host or use an NBD source",
            )

    def _dom(self, ref: str) -> Any:
        try:
            return self.conn().lookupByUUIDString(ref)
        except libvirt.libvirtError:
            try:
                return self.conn().lookupByName(ref)
            except libvirt.libvirtError as e:
                raise _wrap(
                    f"no domain {ref} on {self.uri}",
                    e,
                    "run discovery again; the VM may have been removed",
                ) from e

    # -- discovery -----------------------------------------------------------------------

    @staticmethod
    def _disks(root: ET.Element) -> list[tuple[str, str, str]]:
        """(target, source path, driver type) of copyable disks."""
        out = []
        for d in root.findall("./devices/disk"):
            if d.get("device", "disk") != "disk" or d.find("readonly") is not None:
                continue
            tgt = d.find("target")
            src = d.find("source")
            drv = d.find("driver")
            if tgt is None:
                continue
            path = ""
            if src is not None:
                path = src.get("file") or src.get("dev") or src.get("name") or ""
            out.append(
                (tgt.get("dev", ""), path, drv.get("type", "raw") if drv is not None else "raw")
            )
        return out

    def _machine(self, dom: Any) -> MachineInfo:
        root = ET.fromstring(dom.XMLDesc(0))
        state = dom.state()[0]
        power = {
            libvirt.VIR_DOMAIN_RUNNING: "running",
            libvirt.VIR_DOMAIN_PAUSED: "paused",
            libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
        }.get(state, "unknown")
        disks = []
        for tgt, path, fmt in self._disks(root):
            try:
                size = int(dom.blockInfo(tgt)[0])
            except libvirt.libvirtError:
                size = 0
            disks.append(DiskInfo(key=tgt, size=size, label=path, details={"format": fmt}))
        nics = []
        for n in root.findall("./devices/interface"):
            mac = n.find("mac")
            src = n.find("source")
            model = n.find("model")
            nics.append(
                {
                    "mac": mac.get("address", "") if mac is not None else "",
                    "type": n.get("type", ""),
                    "source": (src.get("network") or src.get("bridge") or src.get("dev") or "")
                    if src is not None
                    else "",
                    "model": model.get("type", "") if model is not None else "",
                }
            )
        os_el = root.find("os")
        firmware = "bios"
        if os_el is not None and (
            os_el.get("firmware") == "efi"
            or (os_el.find("loader") is not None and "ovmf" in _text(os_el.find("loader")).lower())
        ):
            firmware = "efi"
        mem_kib = int(_text(root.find("memory"), "0"))
        return MachineInfo(
            ref=dom.UUIDString(),
            name=dom.name(),
            power_state=power,
            disks=disks,
            cpus=int(_text(root.find("vcpu"), "0")),
            memory_mib=mem_kib // 1024,
            firmware=firmware,
            nics=nics,
            details={"domain_type": root.get("type", ""), "uri": self.uri},
        )

    def discover(self) -> list[MachineInfo]:
        try:
            doms = self.conn().listAllDomains(0)
        except libvirt.libvirtError as e:
            raise _wrap(f"listing domains on {self.uri} failed", e, "check libvirtd") from e
        out = []
        for d in doms:
            m = self._machine(d)
            if m.disks:
                out.append(m)
        return out

    # -- sessions ------------------------------------------------------------------------

    def _checkpoints(self, dom: Any) -> list[str]:
        try:
            return [c.getName() for c in dom.listAllCheckpoints(0)]
        except libvirt.libvirtError:
            return []

    def _prune_checkpoints(self, dom: Any, keep: str | None) -> None:
        for name in self._checkpoints(dom):
            if name.startswith(CHECKPOINT_PREFIX) and name != keep:
                try:
                    dom.checkpointLookupByName(name).delete(0)
                    log.info("%s: deleted stale checkpoint %s", dom.name(), name)
                except libvirt.libvirtError as e:
                    log.warning(
                        "%s: deleting checkpoint %s failed: %s",
                        dom.name(),
                        name,
                        e.get_error_message(),
                    )

    def _incremental_reason(
        self, dom: Any, prev: dict[str, Any] | None, targets: list[str], sizes: dict[str, int]
    ) -> str:
        """'' when an incremental from the previous checkpoint is possible, else why not."""
        if not prev:
            return "first sync"
        name = prev.get("checkpoint")
        if not name:
            return "the previous token has no checkpoint"
        if name not in self._checkpoints(dom):
            return (
                f"checkpoint {name} is missing on the source (libvirt lost its metadata "
                "or the VM was redefined)"
            )
        pdisks = prev.get("disks", {})
        if set(pdisks) != set(targets):
            return (
                f"the disk set changed ({', '.join(sorted(pdisks))} -> "
                f"{', '.join(sorted(targets))})"
            )
        for t in targets:
            if pdisks[t].get("size") != sizes[t]:
                return f"disk {t} changed size ({pdisks[t].get('size')} -> {sizes[t]})"
        try:
            cxml = ET.fromstring(dom.checkpointLookupByName(name).getXMLDesc(0))
        except libvirt.libvirtError as e:
            return f"checkpoint {name} cannot be read: {e.get_error_message()}"
        covered = {
            d.get("name") for d in cxml.findall("./disks/disk") if d.get("checkpoint") == "bitmap"
        }
        missing = [t for t in targets if t not in covered]
        if missing:
            return f"checkpoint {name} has no bitmap for {', '.join(missing)}"
        return ""

    def open_session(
        self, machine_ref: str, previous_token: dict[str, Any] | None
    ) -> LibvirtSession:
        if is_remote(self.uri) and self.remote is None:
            RemoteHost(self.uri)  # raises: only ssh reaches the backup socket on that host
        dom = self._dom(machine_ref)
        if not dom.isActive():
            raise LibvirtSourceError(
                f"domain {dom.name()} is not running; pull-mode backups need a running VM",
                hint="start the VM, or export its disk files through an NBD source",
            )
        root = ET.fromstring(dom.XMLDesc(0))
        disks = self._disks(root)
        bad = [t for t, _, fmt in disks if fmt != "qcow2"]
        if bad:
            raise LibvirtSourceError(
                f"domain {dom.name()}: disks {', '.join(bad)} are not qcow2; checkpoints "
                "(dirty bitmaps) need qcow2",
                hint="convert the disks to qcow2",
            )
        targets = [t for t, _, _ in disks]
        sizes = {t: int(dom.blockInfo(t)[0]) for t in targets}
        prev_cp = (previous_token or {}).get("checkpoint")
        # A stale job of a crashed daemon would block backupBegin: end it first.
        _abort_backup(dom)
        self._prune_checkpoints(dom, keep=prev_cp)
        reason = self._incremental_reason(dom, previous_token, targets, sizes)
        try:
            return self._begin(dom, targets, sizes, prev_cp if not reason else None, reason)
        except libvirt.libvirtError as e:
            if reason:
                raise _wrap(
                    f"starting the backup of {dom.name()} failed",
                    e,
                    "check the VM's disks and libvirtd's log",
                ) from e
            # qemu refused the incremental: bitmap missing or inconsistent. Full resync.
            why = f"incremental from {prev_cp} refused by the hypervisor ({e.get_error_message()})"
            log.warning("%s: %s; full resync", dom.name(), why)
            _abort_backup(dom)
            with contextlib.suppress(libvirt.libvirtError):
                dom.checkpointLookupByName(prev_cp).delete(
                    libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
                )
            try:
                return self._begin(dom, targets, sizes, None, why)
            except libvirt.libvirtError as e2:
                raise _wrap(
                    f"starting a full backup of {dom.name()} failed",
                    e2,
                    "check the VM's disks and libvirtd's log",
                ) from e2

    def reattach(self, machine_ref: str, snapshot_id: str) -> LibvirtSession | None:
        """After a daemon crash: the backup job of ``snapshot_id`` (our checkpoint name) may
        still run in libvirtd. Reattach to it so the sync resumes from its journal; None when
        that job is gone (then the sync restarts from the last restore point)."""
        dom = self._dom(machine_ref)
        try:
            if dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
                return None
            bxml = ET.fromstring(dom.backupGetXMLDesc(0))
            names = self._checkpoints(dom)
        except libvirt.libvirtError:
            return None
        if snapshot_id not in names or bxml.get("mode") != "pull":
            return None
        # The job's checkpoint is the newest: nothing was created after it.
        try:
            cur = dom.checkpointLookupByName(snapshot_id)
            if cur.listAllChildren(0):
                return None
        except libvirt.libvirtError:
            return None
        server = bxml.find("server")
        if server is None or not server.get("socket"):
            return None
        sock = Path(server.get("socket", ""))
        if self.remote is None and not sock.exists():
            return None
        incremental = _text(bxml.find("incremental")) or None
        disks = []
        scratch = []
        for d in bxml.findall("./disks/disk"):
            if d.get("backup") != "yes":
                continue
            t = d.get("name", "")
            sc = d.find("scratch")
            if sc is not None and sc.get("file"):
                scratch.append(Path(sc.get("file", "")))
            size = int(dom.blockInfo(t)[0])
            disks.append(
                LibvirtDiskExport(
                    disk=DiskInfo(key=t, size=size, label=t),
                    nbd_uri=f"nbd+unix:///{t}?socket={sock}",
                    mode="dirty" if incremental else "full",
                    target=t,
                )
            )
        if not disks:
            return None
        session = LibvirtSession(
            snapshot_id=snapshot_id,
            disks=disks,
            full=incremental is None,
            reason="reattached to the running backup job",
            # The freeze of the crashed run is not known any more: claim no more than this.
            consistency=Consistency.CRASH_CONSISTENT,
            dom=dom,
            socket=sock,
            scratch=scratch,
            checkpoint=snapshot_id,
            remote=self.remote,
        )
        try:
            self._connect_data_path(session, snapshot_id.rsplit("-", 1)[-1])
        except FerrymanError as e:
            log.warning("%s: cannot reach the running backup job: %s", dom.name(), e)
            return None
        return session

    def _freeze(self, dom: Any, notes: list[str]) -> bool:
        """Freeze the guest's filesystems through its agent; False (and a note) when the
        agent does not answer: the point is then crash-consistent."""
        if not self.quiesce:
            return False
        try:
            n = dom.fsFreeze(None, 0)
            log.info("%s: %s filesystems frozen", dom.name(), n)
            return True
        except libvirt.libvirtError as e:
            why = (e.get_error_message() or "").strip()
            log.info("%s: no quiesce (%s): crash-consistent", dom.name(), why)
            notes.append(
                f"not quiesced: the guest agent did not answer ({why}); the point is "
                "crash-consistent"
            )
            return False

    def _connect_data_path(self, session: LibvirtSession, sid: str) -> None:
        """Remote host: tunnel the backup socket here and point every export at it. Then
        wait until the exports answer."""
        if self.remote is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            session.tunnel = Tunnel(
                self.remote,
                self.run_dir / f"bk-{sid}.tunnel.sock",
                session.socket,
                self.run_dir / f"bk-{sid}.tunnel.log",
            )
            for d in session.disks:
                d.nbd_uri = session.tunnel.uri(d.target)
            session.tunnel.wait(session.disks[0].target)
        else:
            self._wait_socket(session.socket)

    def _begin(
        self,
        dom: Any,
        targets: list[str],
        sizes: dict[str, int],
        incremental: str | None,
        reason: str,
    ) -> LibvirtSession:
        sid = uuid.uuid4().hex[:8]
        cp = f"{CHECKPOINT_PREFIX}{int(time.time())}-{sid}"
        if self.remote is not None:
            sock_dir = scratch_dir = self.remote_dir
            self.remote.prepare_dir(sock_dir)
        else:
            sock_dir, scratch_dir = self.run_dir, self.scratch_dir
            sock_dir.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(PermissionError):
                os.chmod(sock_dir, 0o1777)  # libvirt-qemu creates the socket here
        sock = sock_dir / f"bk-{sid}.sock"
        scratch = [scratch_dir / f"bk-{sid}-{t}.scratch.qcow2" for t in targets]
        bx = ET.Element("domainbackup", mode="pull")
        if incremental:
            ET.SubElement(bx, "incremental").text = incremental
        ET.SubElement(bx, "server", transport="unix", socket=str(sock))
        bdisks = ET.SubElement(bx, "disks")
        for t, s in zip(targets, scratch, strict=True):
            d = ET.SubElement(bdisks, "disk", name=t, backup="yes", type="file")
            ET.SubElement(d, "scratch", file=str(s))
        cx = ET.Element("domaincheckpoint")
        ET.SubElement(cx, "name").text = cp
        cdisks = ET.SubElement(cx, "disks")
        for t in targets:
            ET.SubElement(cdisks, "disk", name=t, checkpoint="bitmap")
        notes: list[str] = []
        frozen = self._freeze(dom, notes)
        try:
            dom.backupBegin(
                ET.tostring(bx, encoding="unicode"), ET.tostring(cx, encoding="unicode"), 0
            )
        finally:
            if frozen:
                try:
                    dom.fsThaw(None, 0)
                except libvirt.libvirtError as e:
                    log.error("%s: fsThaw failed: %s", dom.name(), e.get_error_message())
        exports = [
            LibvirtDiskExport(
                disk=DiskInfo(key=t, size=sizes[t], label=t),
                nbd_uri=f"nbd+unix:///{t}?socket={sock}",
                mode="dirty" if incremental else "full",
                target=t,
            )
            for t in targets
        ]
        session = LibvirtSession(
            snapshot_id=cp,
            disks=exports,
            full=incremental is None,
            reason=reason,
            consistency=Consistency.QUIESCED if frozen else Consistency.CRASH_CONSISTENT,
            dom=dom,
            socket=sock,
            scratch=scratch,
            checkpoint=cp,
            notes=notes,
            remote=self.remote,
        )
        try:
            self._connect_data_path(session, sid)
        except BaseException:
            session.release()
            raise
        return session

    @staticmethod
    def _wait_socket(sock: Path, timeout: float = 15.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if sock.exists():
                return
            time.sleep(0.05)
        raise LibvirtSourceError(
            f"the backup NBD socket {sock} did not appear",
            hint=f"check libvirtd's log and that libvirt-qemu may write to {sock.parent}",
        )
