"""Sync orchestration: one sync job makes one restore point of every disk of a machine.

    open source session (one frozen snapshot for all disks)
      -> per disk: new overlay over the newest point, served by qemu-nbd; copier writes it;
         extents reach the journal only after a covering flush
      -> seal every disk (flush, stop writer, qemu-img check, read-only)
      -> [verify against the snapshot while it exists]
      -> record the restore point and its commit token in ONE transaction
      -> release the source snapshot / end the backup job

A crash anywhere before the record leaves no restore point in the store. Disk chains that
hold a sealed point the store does not know (crash between sealing two disks) are trimmed
back by ``reconcile`` before the next sync. A sync resumed after a daemon crash reuses its
journal only when the source still shows the same snapshot; otherwise the partial overlay
is discarded and the sync starts again from the last restore point: data of two snapshots
is never mixed (reliability row 20).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd
from sqlite_utils import Database

from appliance import inventory
from appliance.config import paths
from appliance.daemon.jobs import JobContext
from appliance.datapath.chain import DiskChain, Overlay, Point, check_image
from appliance.datapath.copier import (
    FLUSH_INTERVAL_S,
    Copier,
    CopyStats,
    Journal,
    ProgressSink,
    RetryPolicy,
    connect,
)
from appliance.datapath.errors import ChainError
from appliance.datapath.hashing import (
    BLOCK_SIZE,
    HashManifest,
    ManifestBuilder,
    hash_export,
    verify,
)
from appliance.datapath.throttle import Throttle
from appliance.datapath.writer import QemuNbd
from appliance.errors import Cancelled, Conflict, FerrymanError, NotFound
from appliance.sources.base import DiskExport, SyncSession
from store.db import dumps, now, write_txn
from store.records import add_event

log = logging.getLogger(__name__)

DEFAULT_KEEP_POINTS = 14  # a fortnight of daily points; retention merges the oldest
FULL_COMPARE_EVERY = 10  # every Nth sync compares source and point block by block


class ReplicationError(FerrymanError):
    code = "replication"


class StoreJournal:
    """The copier's Journal: durable extents become rows, committed at once."""

    def __init__(self, db: Database, session_id: int) -> None:
        self.db = db
        self.session_id = session_id

    def done(self, disk_key: str, offset: int, length: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO sync_extents (session_id, disk_key, offset, length) "
            "VALUES (?,?,?,?)",
            [self.session_id, disk_key, offset, length],
        )

    def extents(self, disk_key: str) -> list[tuple[int, int]]:
        return [
            (o, n)
            for o, n in self.db.execute(
                "SELECT offset, length FROM sync_extents WHERE session_id=? AND disk_key=? "
                "ORDER BY offset",
                [self.session_id, disk_key],
            )
        ]


def machine_dir(machine_id: int) -> Path:
    return paths().volume_dir / f"machine-{machine_id}"


def writer_dir() -> Path:
    return paths().run_dir / "writers"


def point_name(session_id: int) -> str:
    """The chain point name of a restore point: its sync session, so a resume finds it."""
    return f"rp{session_id:06d}"


def newest_point(db: Database, machine_id: int) -> dict[str, Any] | None:
    rps = inventory.restore_points(db, machine_id)
    return rps[-1] if rps else None


def chain_for(mdir: Path, key: str, size: int) -> DiskChain:
    """The chain of a disk of this size. A disk resized on the source starts a new chain
    beside the old one (whose points stay restorable): a qcow2 overlay cannot change the
    size of its backing chain, and a resize always comes with a full copy."""
    chain = DiskChain(mdir / key)
    newest = chain.newest()
    if newest is None or newest.size == size:
        return chain
    return DiskChain(mdir / f"{key}.size-{size}")


def reconcile(db: Database, machine_id: int, chains: dict[str, DiskChain]) -> list[str]:
    """Trim chain points the store never recorded (a crash between sealing and recording)."""
    known = {
        point_name(int(s))
        for (s,) in db.execute(
            "SELECT session_id FROM restore_points WHERE machine_id=? AND state='sealed'",
            [machine_id],
        )
    }
    out = []
    for key, chain in chains.items():
        out += [f"{key}: {x}" for x in chain.recover()]
        while (p := chain.newest()) is not None and p.name not in known:
            chain.delete_newest()
            out.append(f"{key}: removed unrecorded point {p.name}")
    return out


def _session_row(
    ctx: JobContext, machine_id: int, session: SyncSession, parent_rp: int | None
) -> tuple[int, bool]:
    """Resume the interrupted sync of the same snapshot, or start a new session row."""
    db = ctx.db
    row = db.execute(
        "SELECT id, snapshot_id FROM sync_sessions WHERE machine_id=? AND "
        "state='copying' ORDER BY id DESC LIMIT 1",
        [machine_id],
    ).fetchone()
    if row and row[1] == session.snapshot_id:
        ctx.event(f"resuming sync session {row[0]} of snapshot {session.snapshot_id}")
        return int(row[0]), True
    if row:
        db.execute(
            "UPDATE sync_sessions SET state='abandoned', ended_at=? WHERE id=?", [now(), row[0]]
        )
        ctx.event(
            f"sync session {row[0]} cannot resume: its source snapshot {row[1]} is gone "
            f"(the source now shows {session.snapshot_id}); starting again from the last "
            "restore point",
            level="warning",
        )
    cur = db.execute(
        "INSERT INTO sync_sessions (machine_id, job_id, snapshot_id, parent_rp_id, full, "
        "reason, state, started_at) VALUES (?,?,?,?,?,?,'copying',?)",
        [
            machine_id,
            ctx.job_id,
            session.snapshot_id,
            parent_rp,
            int(session.full),
            session.reason,
            now(),
        ],
    )
    return int(cur.lastrowid or 0), False


def manifest_path(chain: DiskChain, point: str) -> Path:
    return chain.dir / f"{point}.manifest.json"


def flush_interval() -> float:
    """Seconds between journal flushes (FERRYMAN_FLUSH_INTERVAL_S): the most a crash
    re-copies on a slow link."""
    return float(os.environ.get("FERRYMAN_FLUSH_INTERVAL_S", FLUSH_INTERVAL_S))


# -- the data path of one sync: copy every disk, seal them all, hash and verify ----------
# Disks are copied one after the other: on 2 cores one copier already keeps the source and
# the writer busy; parallel disks would only split the same bandwidth.


@dataclass
class DiskResult:
    disk_key: str
    mode: str  # what was done: "full" | "dirty" | "compare"
    point: Point | None = None
    stats: CopyStats = field(default_factory=CopyStats)
    resumed: bool = False
    manifest: Path | None = None  # block hashes of the sealed point
    manifest_digest: str | None = None
    verify: dict[str, Any] | None = None  # comparison with the source snapshot
    notes: list[str] = field(default_factory=list)
    hash_block: int = 0  # >0: hashes were wanted with this block size

    def as_dict(self) -> dict[str, Any]:
        return {
            "disk": self.disk_key,
            "mode": self.mode,
            "point": self.point.name if self.point else None,
            "file": self.point.file if self.point else None,
            "stats": self.stats.as_dict(),
            "resumed": self.resumed,
            "manifest_digest": self.manifest_digest,
            "verify": self.verify,
            "notes": self.notes,
        }


def _max_request(uri: str) -> int:
    """The largest request the source accepts, as a power of two (hash block size)."""
    try:
        h = connect(uri, name="probe")
        mx = int(h.get_block_size(nbd.SIZE_MAXIMUM)) or BLOCK_SIZE
    except nbd.Error:
        return BLOCK_SIZE  # the copier reports the connection problem properly
    return 1 << (mx.bit_length() - 1)


def copy_disk(
    export: DiskExport,
    chain: DiskChain,
    *,
    point_name: str,
    snapshot_id: str,
    socket_dir: Path,
    progress: ProgressSink | None = None,
    cancel: threading.Event | None = None,
    throttle: Throttle | None = None,
    journal: Journal | None = None,
    resume_from: Iterable[tuple[int, int]] = (),
    retry: RetryPolicy | None = None,
    hash_manifest: bool | None = None,
    cache: str | None = None,
    **copier_opts: Any,
) -> tuple[Overlay, DiskResult]:
    """Copy one disk into its partial overlay. The overlay is left stopped and unsealed.

    ``resume_from``: extents the journal says are durable in THIS snapshot's partial overlay;
    honoured only when the partial overlay of the same snapshot still exists."""
    key = export.disk.key
    ov = chain.begin(point_name, snapshot_id, export.disk.size)
    res = DiskResult(disk_key=key, mode=export.mode, resumed=ov.resumed)
    done = list(resume_from)
    if done and not ov.resumed:
        res.notes.append("journal entries ignored: the partial overlay was not found")
        done = []
    mode = export.mode
    parent = chain.newest()
    previous: HashManifest | None = None
    if mode == "compare":
        mp = manifest_path(chain, parent.name) if parent else None
        if mp is not None and mp.exists():
            previous = HashManifest.load(mp)
            if previous.size != export.disk.size:
                previous = None
        if previous is None:
            res.notes.append("no hash manifest of the previous point: full copy")
            mode = res.mode = "full"
    if mode == "full" and parent is not None:
        res.notes.append("full copy into an overlay: every extent is written")
    if hash_manifest is None:
        hash_manifest = export.mode == "compare" or bool(getattr(export, "hash_manifest", False))
    hasher = None
    if hash_manifest or previous is not None:
        block = min(BLOCK_SIZE, _max_request(export.nbd_uri))
        if previous is not None and previous.block_size != block:
            res.notes.append("previous manifest has another block size: full copy")
            previous, mode, res.mode = None, "full", "full"
        hasher = ManifestBuilder(
            export.disk.size, block, previous=previous, compare=previous is not None
        )
        res.hash_block = block
    if mode == "dirty" and parent is None:
        ov.discard()
        raise ChainError(
            f"disk {key}: an incremental sync needs a previous restore point, the chain in "
            f"{chain.dir} has none",
            hint="sync again with a full copy (ferryman sync --full)",
        )
    exts = list(export.extents())
    try:
        uri = ov.start_writer(socket_dir, cache=cache)
        cp = Copier(
            disk_key=key,
            source_uri=export.nbd_uri,
            target_uri=uri,
            progress=progress,
            cancel=cancel,
            throttle=throttle,
            journal=journal,
            retry=retry,
            target_is_zero=ov.fresh,
            hasher=hasher,
            **copier_opts,
        )
        res.stats = cp.copy(exts, resume_from=done)
        ov.stop_writer()
    except BaseException:
        # Flushed data stays for a resume; the writer must not outlive the sync.
        try:
            ov.stop_writer()
        except Exception:  # the writer died: its own error is the one that matters
            ov.kill_writer()
        raise
    if hasher is not None and not done:
        man = hasher.manifest
        if man.complete():
            man.save(chain.dir / f"{point_name}.manifest.json.partial")
            res.manifest_digest = man.digest()
    res.notes += [n for n in getattr(export, "notes", [])]
    return ov, res


def seal_disk(ov: Overlay, res: DiskResult) -> DiskResult:
    res.point = ov.seal()
    partial_manifest = ov.chain.dir / f"{ov.name}.manifest.json.partial"
    if partial_manifest.exists():
        res.manifest = manifest_path(ov.chain, ov.name)
        partial_manifest.rename(res.manifest)
    return res


def _after_seal(
    export: DiskExport,
    chain: DiskChain,
    res: DiskResult,
    socket_dir: Path,
    verify_after: bool,
    progress: ProgressSink | None,
    cancel: threading.Event | None,
) -> None:
    """Record the point's block hashes; with ``verify_after`` compare it with the snapshot."""
    assert res.point is not None
    key, point = res.disk_key, res.point.name
    mp = manifest_path(chain, point)
    src_manifest: HashManifest | None = getattr(export, "manifest", None)
    if src_manifest is not None:  # linux-agent: hashed on the server while reading
        src_manifest.save(mp)
        res.manifest = mp
    need_hash = res.hash_block > 0 and res.manifest is None  # resumed: earlier hashes lost
    if not verify_after and not need_hash:
        return
    if progress is not None:
        what = "verifying" if verify_after else "hashing (resumed sync)"
        progress.set_phase(f"{what} disk {key}", disk=key)
    with (
        chain.reading(point, "sync verify") as path,
        QemuNbd(path, socket_dir, read_only=True) as reader,
    ):
        if verify_after and src_manifest is None:
            vr = verify(
                export.nbd_uri, reader.uri, disk=key, cancel=cancel, raise_on_mismatch=False
            )
            res.verify = vr.as_dict()
            if res.manifest is None:
                vr.target.save(mp)
                res.manifest = mp
            return
        got = hash_export(
            reader.uri,
            disk=key,
            block_size=res.hash_block or (src_manifest.block_size if src_manifest else BLOCK_SIZE),
            cancel=cancel,
        )
    if res.manifest is None:
        got.save(mp)
        res.manifest = mp
    if verify_after and src_manifest is not None:
        # The source hashed its snapshot itself: only the local point is read, so no disk
        # crosses the (WAN) link a second time.
        bad = src_manifest.diff(got)
        res.verify = {
            "ok": not bad,
            "blocks": got.blocks,
            "mismatches": bad[:100],
            "mismatch_count": len(bad),
            "source_digest": src_manifest.digest(),
            "target_digest": got.digest(),
        }


def sync_disks(
    session: SyncSession,
    chains: Mapping[str, DiskChain],
    *,
    point_name: str,
    socket_dir: Path,
    progress: ProgressSink | None = None,
    cancel: threading.Event | None = None,
    throttle: Throttle | None = None,
    journal: Journal | None = None,
    resume_from: Mapping[str, Iterable[tuple[int, int]]] | None = None,
    retry: RetryPolicy | None = None,
    verify_after: bool = False,
    **copier_opts: Any,
) -> list[DiskResult]:
    """Copy every disk of the session, then seal them all (one restore point), record their
    hashes and, with ``verify_after``, compare each with the still-frozen source.

    A disk whose newest sealed point already is this point of this snapshot (a crash
    between two seals) is skipped. Does NOT persist the token nor release the session:
    ``run_sync`` does that, in that order."""
    staged: list[tuple[DiskExport, Overlay, DiskResult]] = []
    results: list[tuple[DiskExport, DiskResult]] = []
    n = len(session.disks)
    for i, export in enumerate(session.disks):
        key = export.disk.key
        chain = chains.get(key)
        if chain is None:
            raise ChainError(
                f"no chain for disk {key}", hint="this is a bug in the caller: one chain per disk"
            )
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"sync of {point_name} was cancelled")
        newest = chain.newest()
        if newest and newest.name == point_name and newest.snapshot_id == session.snapshot_id:
            results.append(
                (export, DiskResult(key, export.mode, point=newest, notes=["already sealed"]))
            )
            continue
        if progress is not None:
            progress.set_phase(f"copying disk {key} ({i + 1}/{n})", disk=key)
        ov, res = copy_disk(
            export,
            chain,
            point_name=point_name,
            snapshot_id=session.snapshot_id,
            socket_dir=socket_dir,
            progress=progress,
            cancel=cancel,
            throttle=throttle,
            journal=journal,
            resume_from=(resume_from or {}).get(key, ()),
            retry=retry,
            **copier_opts,
        )
        staged.append((export, ov, res))
    for export, ov, res in staged:
        results.append((export, seal_disk(ov, res)))
    for export, res in results:
        if res.point is not None and "already sealed" not in res.notes:
            _after_seal(
                export, chains[res.disk_key], res, socket_dir, verify_after, progress, cancel
            )
    order = {e.disk.key: i for i, e in enumerate(session.disks)}
    return [r for _, r in sorted(results, key=lambda t: order[t[1].disk_key])]


def effective_throttle(caps: dict[str, int | None]) -> int | None:
    """The lowest cap that is set; None = no throttle."""
    set_ = [c for c in caps.values() if c]
    return min(set_) if set_ else None


def record_point_disks(db: Database, rp_id: int, disks: list[dict[str, Any]]) -> None:
    """The per-disk rows of a new restore point (inside the caller's transaction)."""
    for d in disks:
        db.execute(
            "INSERT INTO restore_point_disks (restore_point_id, disk_key, path, size, "
            "manifest) VALUES (?,?,?,?,?)",
            [rp_id, d["disk_key"], d["path"], d["size"], d["manifest"]],
        )


def run_sync(ctx: JobContext) -> dict[str, Any]:
    db = ctx.db
    assert ctx.machine_id is not None
    m = inventory.machine_row(db, str(ctx.machine_id))
    if m["cutover_done"]:
        raise ReplicationError(
            f"'{m['name']}' was cut over; it is not replicated any more", hint="nothing to do"
        )
    src = inventory.source_row(db, str(m["source_id"]))
    from appliance.daemon.state import adapter_for

    adapter = adapter_for(db, src)
    prev = newest_point(db, m["id"])
    want_full = bool(ctx.params.get("full")) or prev is None
    if prev is not None and prev["verified"] == "mismatch" and not want_full:
        # The last point differs from its source: change tracking missed something (or the
        # point rotted). Trust nothing it says: copy everything again.
        want_full = True
        ctx.event(
            f"full resync of {m['name']}: restore point {prev['id']} failed its "
            "comparison with the source",
            level="warning",
        )
    ctx.progress.set_phase("opening a source snapshot")
    source_time = now()
    session: SyncSession | None = None
    reattach = getattr(adapter, "reattach", None)
    if ctx.resumed and reattach is not None:
        # After a daemon crash libvirt's backup job may still hold the same frozen state:
        # reattaching lets the journal skip what is already durable.
        row = db.execute(
            "SELECT snapshot_id, started_at FROM sync_sessions WHERE machine_id=? "
            "AND state='copying' ORDER BY id DESC LIMIT 1",
            [m["id"]],
        ).fetchone()
        if row is not None:
            session = reattach(m["ref"], row[0])
            if session is not None:
                source_time = row[1]
                ctx.event(
                    f"reattached to the running backup job of {m['name']} (checkpoint {row[0]})"
                )
    if session is None:
        # The last delta of a cutover (services stopped): a source that can make that pass
        # consistent does (linux-agent: live filesystems frozen for the whole copy).
        final = getattr(adapter, "open_final_pass", None) if ctx.params.get("final_pass") else None
        session = (final or adapter.open_session)(
            m["ref"], None if want_full else prev["token"] if prev else None
        )
    watch = getattr(session, "watch", None)
    if watch is not None:  # linux-agent: a snapshot that overflows cancels the copy at once
        watch(ctx.cancel)
    try:
        return _sync(ctx, m, src, prev, session, source_time, want_full)
    except Cancelled as e:
        failure = getattr(session, "failure", lambda: None)()
        if failure is not None:  # the source's own explanation beats "cancelled"
            raise failure from e
        raise
    finally:
        try:
            session.release()
        except Exception as e:  # never hide the sync's own error behind a release error
            log.warning("releasing the source snapshot of %s failed: %s", m["name"], e)
            ctx.event(f"could not release the source snapshot of {m['name']}: {e}", level="warning")


def _sync(
    ctx: JobContext,
    m: dict[str, Any],
    src: dict[str, Any],
    prev: dict[str, Any] | None,
    session: SyncSession,
    source_time: str,
    want_full: bool,
) -> dict[str, Any]:
    db = ctx.db
    if session.full and not want_full:
        ctx.event(f"full resync of {m['name']}: {session.reason}", level="warning")
    for note in getattr(session, "notes", []):  # e.g. libvirt: not quiesced, and why
        ctx.event(f"{m['name']}: {note}", level="warning")
    sid, resumed = _session_row(ctx, m["id"], session, prev["id"] if prev else None)
    journal = StoreJournal(db, sid)
    mdir = machine_dir(m["id"])
    chains = {d.disk.key: chain_for(mdir, d.disk.key, d.disk.size) for d in session.disks}
    for line in reconcile(db, m["id"], chains):
        ctx.event(f"{m['name']}: {line}", level="warning")
    # The lower of the machine's own throttle and its source's (a cap on every sync from
    # that source); either changes while the sync runs.
    caps = {"machine": m["throttle_bps"], "source": (src.get("params") or {}).get("throttle_bps")}
    throttle = Throttle(effective_throttle(caps))

    def on_live(v: dict[str, Any]) -> None:
        for key, cap in (("throttle_bps", "machine"), ("source_throttle_bps", "source")):
            if key in v:
                caps[cap] = v[key]
        throttle.set_rate(effective_throttle(caps))

    ctx.on_live = on_live
    sync_no = (
        db.execute("SELECT count(*) FROM restore_points WHERE machine_id=?", [m["id"]]).fetchone()[
            0
        ]
        + 1
    )
    compare = (
        bool(m["verify_every_sync"])
        or sync_no % FULL_COMPARE_EVERY == 0
        or bool(ctx.params.get("verify"))
    )
    results = sync_disks(
        session,
        chains,
        point_name=point_name(sid),
        socket_dir=writer_dir(),
        progress=ctx.progress,
        cancel=ctx.cancel,
        throttle=throttle,
        journal=journal,
        resume_from={k: journal.extents(k) for k in chains},
        verify_after=compare,
        flush_interval=flush_interval(),
    )
    disks_out: list[dict[str, Any]] = []
    totals = dict.fromkeys(
        (
            "bytes_read",
            "bytes_written",
            "bytes_zeroed",
            "bytes_skipped_resume",
            "bytes_unchanged",
        ),
        0,
    )
    verified: str | None = None
    sizes = {d.disk.key: d.disk.size for d in session.disks}
    for r in results:
        assert r.point is not None
        for note in r.notes:
            ctx.event(f"disk {r.disk_key} of {m['name']}: {note}")
        if r.verify is not None:
            bad = r.verify["mismatches"]
            if bad:
                verified = "mismatch"
                ctx.event(
                    f"disk {r.disk_key} of {m['name']}: {r.verify['mismatch_count']} blocks "
                    f"differ from the source snapshot (first at offset {bad[0]}); the next "
                    "sync is a full resync",
                    level="error",
                )
            elif verified is None:
                verified = "ok"
        for k in totals:
            totals[k] += int(getattr(r.stats, k))
        disks_out.append(
            {
                "disk_key": r.disk_key,
                "path": str(chains[r.disk_key].path_of(r.point)),
                "size": sizes[r.disk_key],
                "manifest": str(r.manifest) if r.manifest else None,
                "stats": r.stats.as_dict(),
            }
        )
    ctx.check_cancel()
    token = session.token()
    with write_txn(db):
        cur = db.execute(
            "INSERT INTO restore_points (machine_id, session_id, parent_id, snapshot_id, "
            "source_time, sealed_at, consistency, full, token, verified, verified_at, "
            "bytes_written) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                m["id"],
                sid,
                prev["id"] if prev else None,
                session.snapshot_id,
                source_time,
                now(),
                str(session.consistency.value),
                int(session.full),
                dumps(token),
                verified,
                now() if verified else None,
                totals["bytes_written"],
            ],
        )
        rp_id = int(cur.lastrowid or 0)
        record_point_disks(db, rp_id, disks_out)
        db.execute(
            "UPDATE sync_sessions SET state='sealed', ended_at=?, bytes_read=?, "
            "bytes_written=? WHERE id=?",
            [now(), totals["bytes_read"], totals["bytes_written"], sid],
        )
        db.execute("DELETE FROM sync_extents WHERE session_id=?", [sid])
    kind = "full" if session.full else "incremental"
    ctx.event(
        f"restore point {rp_id} of {m['name']} sealed ({kind}, "
        f"{session.consistency.value}, {totals['bytes_written']} bytes written)",
        kind="sync",
    )
    if verified == "mismatch":
        add_event(
            db,
            f"{m['name']}: restore point {rp_id} differs from its source",
            level="error",
            kind="verify",
            machine_id=m["id"],
            job_id=ctx.job_id,
        )
    retention(ctx, m)
    return {
        "restore_point": rp_id,
        "full": session.full,
        "reason": session.reason,
        "consistency": session.consistency.value,
        "resumed": resumed,
        "verified": verified,
        **totals,
        "disks": [{k: v for k, v in dd.items() if k != "path"} for dd in disks_out],
    }


def retention(ctx: JobContext, m: dict[str, Any]) -> None:
    """Keep the newest N points: merge the oldest into its child, never under a reader."""
    keep = int((m.get("details") or {}).get("keep_points") or DEFAULT_KEEP_POINTS)
    db = ctx.db
    while True:
        rps = inventory.restore_points(db, m["id"])
        if len(rps) <= keep:
            return
        oldest, child = rps[0], rps[1]
        try:
            for d in oldest["disks"]:
                chain = DiskChain(Path(d["path"]).parent)
                from appliance.conversion_jobs import drop_stale_overlay_readers

                drop_stale_overlay_readers(chain)
                chain.merge_oldest()
        except FerrymanError as e:
            ctx.event(f"retention of {m['name']} postponed: {e}", level="warning")
            return
        with write_txn(db):
            db.execute("UPDATE restore_points SET state='merged' WHERE id=?", [oldest["id"]])
            db.execute("UPDATE restore_points SET parent_id=NULL, full=1 WHERE id=?", [child["id"]])
            for d in oldest["disks"]:
                db.execute(
                    "UPDATE restore_point_disks SET path=? WHERE restore_point_id=? AND disk_key=?",
                    [d["path"], child["id"], d["disk_key"]],
                )
        ctx.event(
            f"retention: restore point {oldest['id']} of {m['name']} merged into {child['id']}",
            kind="retention",
        )


def delete_restore_point(db: Database, rp_id: int) -> dict[str, Any]:
    """Delete the newest restore point of a machine (older ones are removed by retention,
    which merges them, since later points depend on them)."""
    row = db.execute(
        "SELECT machine_id FROM restore_points WHERE id=? AND state='sealed'", [rp_id]
    ).fetchone()
    if row is None:
        raise NotFound(f"no restore point {rp_id}", hint="list them with: ferryman points NAME")
    rps = inventory.restore_points(db, int(row[0]))
    if rps[-1]["id"] != rp_id:
        raise Conflict(
            f"restore point {rp_id} has later points that depend on it",
            hint="only the newest point can be deleted; retention merges older ones",
        )
    busy = db.execute(
        "SELECT id FROM jobs WHERE machine_id=? AND state IN ('queued','running')", [row[0]]
    ).fetchone()
    if busy:
        raise Conflict(
            f"job {busy[0]} is running on this machine", hint="wait for it or cancel it first"
        )
    for d in rps[-1]["disks"]:
        DiskChain(Path(d["path"]).parent).delete_newest()
    db.execute("UPDATE restore_points SET state='deleted' WHERE id=?", [rp_id])
    return {"deleted": rp_id}


def _check_chain(path: Path) -> str | None:
    """qemu-img check of the point's file and every file below it; None when all are sound."""
    r = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "--output=json", "-U", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if r.returncode != 0:
        return f"qcow2 unreadable: {(r.stderr or r.stdout).strip()[-200:]}"
    for layer in json.loads(r.stdout):
        try:
            check_image(Path(layer["filename"]))
        except FerrymanError as e:
            return f"qcow2 metadata damaged in {Path(layer['filename']).name}: {e.message}"
    return None


def run_verify(ctx: JobContext) -> dict[str, Any]:
    """Re-read a restore point and compare it with the hashes taken when it was made (bit rot,
    damaged qcow2). Without a manifest, build one now so the next verify can compare."""
    db = ctx.db
    rp_id = int(ctx.params["restore_point"])
    rp = next(
        (r for r in inventory.restore_points(db, int(ctx.machine_id or 0)) if r["id"] == rp_id),
        None,
    )
    if rp is None:
        raise NotFound(f"no restore point {rp_id}", hint="list them with: ferryman points NAME")
    bad: list[str] = []
    built = 0
    for d in rp["disks"]:
        path = Path(d["path"])
        chain = DiskChain(path.parent)
        point = point_name(int(rp["session_id"]))
        ctx.progress.set_phase(f"checking disk {d['disk_key']}")
        damaged = _check_chain(path)
        if damaged:
            bad.append(f"disk {d['disk_key']}: {damaged}")
            continue
        ctx.progress.set_phase(f"reading disk {d['disk_key']}")
        try:
            with (
                chain.reading(point, f"verify job {ctx.job_id}"),
                QemuNbd(path, writer_dir(), read_only=True) as reader,
            ):
                got = hash_export(
                    reader.uri, disk=d["disk_key"], progress=ctx.progress, cancel=ctx.cancel
                )
        except FerrymanError as e:
            bad.append(f"disk {d['disk_key']}: unreadable: {e}")
            continue
        if d["manifest"] and Path(d["manifest"]).exists():
            want = HashManifest.load(Path(d["manifest"]))
            diff = want.diff(got)
            if diff:
                bad.append(
                    f"disk {d['disk_key']}: {len(diff)} blocks differ, first at offset {diff[0]}"
                )
        else:
            mp = manifest_path(chain, point)
            got.save(mp)
            db.execute(
                "UPDATE restore_point_disks SET manifest=? WHERE restore_point_id=? AND disk_key=?",
                [str(mp), rp_id, d["disk_key"]],
            )
            built += 1
    state = "mismatch" if bad else "ok"
    db.execute(
        "UPDATE restore_points SET verified=?, verified_at=? WHERE id=?", [state, now(), rp_id]
    )
    if bad:
        # Later points read through this one wherever they did not overwrite a block.
        later = [
            r["id"]
            for r in inventory.restore_points(db, int(ctx.machine_id or 0))
            if r["id"] > rp_id
        ]
        for lid in later:
            db.execute(
                "UPDATE restore_points SET verified='mismatch', verified_at=? WHERE id=?",
                [now(), lid],
            )
        ctx.event(
            f"restore point {rp_id} FAILED verification: {'; '.join(bad)}"
            + (f"; later points {later} depend on it and are marked too" if later else ""),
            level="error",
        )
        raise ReplicationError(
            f"restore point {rp_id} is damaged: {bad[0]}",
            hint="do not boot it; run a full sync to make a good point",
        )
    return {"restore_point": rp_id, "verified": state, "manifests_built": built}
