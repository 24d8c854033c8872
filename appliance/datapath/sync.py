"""One sync of one machine: every disk of one source snapshot into a new restore point.

Order (design.md): copy every disk into its partial overlay -> flush -> seal every disk
(stop writer, qemu-img check, read-only, listed in chain.json). The caller then persists the
session token and only after that calls ``session.release()``.

Disks are copied one after the other: on 2 cores one copier already keeps the source and
the writer busy; parallel disks would only split the same bandwidth.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd

from appliance.datapath.chain import DiskChain, Overlay, Point
from appliance.datapath.copier import Copier, CopyStats, Journal, ProgressSink, RetryPolicy, connect
from appliance.datapath.errors import ChainError
from appliance.datapath.hashing import BLOCK_SIZE, HashManifest, ManifestBuilder, verify
from appliance.datapath.throttle import Throttle
from appliance.datapath.writer import QemuNbd
from appliance.sources.base import DiskExport, SyncSession

log = logging.getLogger(__name__)


@dataclass
class DiskResult:
    disk_key: str
    mode: str  # what was done: "full" | "dirty" | "compare"
    point: Point | None = None
    stats: CopyStats = field(default_factory=CopyStats)
    resumed: bool = False
    manifest_digest: str | None = None
    verify: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

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


def manifest_path(chain: DiskChain, point: str) -> Path:
    return chain.dir / f"{point}.manifest.json"


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
    want_hashes = hash_manifest
    hasher = None
    if want_hashes or previous is not None:
        block = min(BLOCK_SIZE, _max_request(export.nbd_uri))
        if previous is not None and previous.block_size != block:
            res.notes.append("previous manifest has another block size: full copy")
            previous, mode, res.mode = None, "full", "full"
        hasher = ManifestBuilder(
            export.disk.size, block, previous=previous, compare=previous is not None
        )
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
        partial_manifest.rename(manifest_path(ov.chain, ov.name))
    return res


def sync_session(
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
    """Copy every disk of the session, then seal them all (one restore point).

    A disk whose newest sealed point already is this point of this snapshot (a crash
    between two seals) is skipped. Does NOT persist the token nor release the session."""
    staged: list[tuple[Overlay, DiskResult]] = []
    results: list[DiskResult] = []
    for export in session.disks:
        chain = chains.get(export.disk.key)
        if chain is None:
            raise ChainError(
                f"no chain for disk {export.disk.key}",
                hint="this is a bug in the caller: one chain per disk",
            )
        newest = chain.newest()
        if newest and newest.name == point_name and newest.snapshot_id == session.snapshot_id:
            results.append(
                DiskResult(export.disk.key, export.mode, point=newest, notes=["already sealed"])
            )
            continue
        staged.append(
            copy_disk(
                export,
                chain,
                point_name=point_name,
                snapshot_id=session.snapshot_id,
                socket_dir=socket_dir,
                progress=progress,
                cancel=cancel,
                throttle=throttle,
                journal=journal,
                resume_from=(resume_from or {}).get(export.disk.key, ()),
                retry=retry,
                **copier_opts,
            )
        )
    for ov, res in staged:
        results.append(seal_disk(ov, res))
    if verify_after:
        by_key = {e.disk.key: e for e in session.disks}
        for res in results:
            if res.point is None:
                continue
            chain = chains[res.disk_key]
            with (
                chain.reading(res.point.name, "verify") as path,
                QemuNbd(path, socket_dir, read_only=True) as rd,
            ):
                vr = verify(by_key[res.disk_key].nbd_uri, rd.uri, disk=res.disk_key, cancel=cancel)
                res.verify = vr.as_dict()
    return results
