"""Generic NBD source: any NBD URI an operator already has (qemu-nbd, nbdkit, a SAN gateway).

Three modes per disk, chosen in ``open_session``:
- full: first sync, or nothing better is possible; block status elides zeroes;
- dirty: the export offers ``qemu:dirty-bitmap:<name>`` (qemu-nbd --bitmap, qemu's NBD
  server): only dirty ranges are read, intersected with base:allocation;
- compare: no bitmap; every data block is read and hashed, and only blocks whose hash differs
  from the previous restore point's manifest are written. Reads are not saved, writes are,
  and the manifest doubles as the verify baseline.

A generic export has no snapshot identity of its own: the operator may name one
(``snapshot_id`` in the source config, e.g. the LVM snapshot name); otherwise each session
is a new identity, so a resume after a crash restarts from the last restore point instead of
mixing two states of a live export.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import nbd

from appliance.datapath import extents as ex
from appliance.datapath.copier import connect
from appliance.errors import FerrymanError
from appliance.sources.base import Consistency, DiskInfo, Extent, MachineInfo

log = logging.getLogger(__name__)

BITMAP_PREFIX = "qemu:dirty-bitmap:"
CONNECT_TIMEOUT_S = 20.0


class NbdSourceError(FerrymanError):
    code = "nbd_source"


def _open(uri: str, contexts: list[str] | tuple[str, ...] = ()) -> Any:
    try:
        return connect(uri, name="ferryman-src", contexts=list(contexts), timeout=CONNECT_TIMEOUT_S)
    except nbd.Error as e:
        raise NbdSourceError(
            f"cannot open NBD export {uri}: {e.string}",
            hint="check the URI (nbd://host:port/export or nbd+unix:///export?socket=PATH), "
            "that the server runs and that this appliance may reach it",
        ) from e


def list_bitmaps(uri: str) -> list[str]:
    """Dirty bitmaps the export offers (names without the qemu:dirty-bitmap: prefix)."""
    h = nbd.NBD()
    h.set_opt_mode(True)
    try:
        h.connect_uri(uri)
    except nbd.Error as e:
        raise NbdSourceError(
            f"cannot open NBD export {uri}: {e.string}",
            hint="check the URI and that the server runs",
        ) from e
    found: list[str] = []
    try:

        def add(name: str) -> int:
            found.append(name)
            return 0

        h.opt_list_meta_context(add)
    except nbd.Error as e:
        log.info("%s: listing meta contexts failed (%s): no bitmaps", uri, e)
    finally:
        try:
            h.opt_abort()
        except nbd.Error:
            pass
    return [n[len(BITMAP_PREFIX) :] for n in found if n.startswith(BITMAP_PREFIX)]


@dataclass
class NbdDiskExport:
    disk: DiskInfo
    nbd_uri: str
    mode: str  # "full" | "dirty" | "compare"
    bitmap: str | None = None
    notes: list[str] = field(default_factory=list)
    # Build a hash manifest while copying: the next sync may have to compare against it.
    hash_manifest: bool = True

    def extents(self) -> Iterator[Extent]:
        h = _open(
            self.nbd_uri,
            [ex.BASE_ALLOCATION] + ([BITMAP_PREFIX + self.bitmap] if self.bitmap else []),
        )
        try:
            exts, note = ex.query_extents(
                h,
                h.get_size(),
                dirty_context=BITMAP_PREFIX + self.bitmap
                if self.mode == "dirty" and self.bitmap
                else None,
            )
        except nbd.Error as e:
            raise NbdSourceError(
                f"block status of {self.nbd_uri} failed: {e.string}",
                hint="the export may have been stopped; sync again",
            ) from e
        if note:
            self.notes.append(note)
        yield from exts


@dataclass
class NbdSession:
    snapshot_id: str
    disks: list[NbdDiskExport]  # type: ignore[assignment]
    full: bool
    reason: str
    consistency: Consistency = Consistency.CRASH_INCONSISTENT

    def token(self) -> dict[str, Any]:
        return {
            "kind": "nbd",
            "snapshot_id": self.snapshot_id,
            "disks": {
                d.disk.key: {"mode": d.mode, "bitmap": d.bitmap, "size": d.disk.size}
                for d in self.disks
            },
        }

    def release(self) -> None:
        """Nothing to release: the operator owns the export."""


class NbdSource:
    """config: {"disks": {"vda": "nbd+unix:///?socket=..."}, "name": "web01",
    "snapshot_id": optional, "bitmap": optional name, "consistency": optional}."""

    kind = "nbd"

    def __init__(self, config: dict[str, Any]) -> None:
        disks = config.get("disks") or ({"disk0": config["uri"]} if "uri" in config else {})
        if not disks:
            raise NbdSourceError(
                "an NBD source needs at least one URI",
                hint='give "uri" or "disks": {"vda": "nbd://..."}',
            )
        self.disks: dict[str, str] = dict(disks)
        self.name: str = config.get("name") or next(iter(self.disks.values()))
        self.snapshot_id: str | None = config.get("snapshot_id")
        self.bitmap: str | None = config.get("bitmap")
        self.consistency = Consistency(
            config.get("consistency", Consistency.CRASH_INCONSISTENT.value)
        )

    def ref(self) -> str:
        return hashlib.sha256("\n".join(sorted(self.disks.values())).encode()).hexdigest()[:16]

    def test(self) -> None:
        for uri in self.disks.values():
            h = _open(uri)
            del h

    def _size(self, uri: str) -> int:
        h = _open(uri)
        return int(h.get_size())

    def discover(self) -> list[MachineInfo]:
        disks = [DiskInfo(key=k, size=self._size(u), label=u) for k, u in self.disks.items()]
        return [MachineInfo(ref=self.ref(), name=self.name, power_state="unknown", disks=disks)]

    def open_session(self, machine_ref: str, previous_token: dict[str, Any] | None) -> NbdSession:
        prev = (previous_token or {}).get("disks", {})
        exports: list[NbdDiskExport] = []
        reasons = []
        full = True
        for key, uri in self.disks.items():
            size = self._size(uri)
            disk = DiskInfo(key=key, size=size, label=uri)
            p = prev.get(key)
            if p is None:
                exports.append(NbdDiskExport(disk, uri, "full", hash_manifest=not self.bitmap))
                reasons.append(
                    f"{key}: first sync" if previous_token is None else f"{key}: new disk"
                )
                continue
            if p.get("size") != size:
                exports.append(NbdDiskExport(disk, uri, "full"))
                reasons.append(f"{key}: size changed {p.get('size')} -> {size}")
                continue
            bitmaps = list_bitmaps(uri)
            want = self.bitmap or p.get("bitmap")
            if want and want in bitmaps:
                exports.append(NbdDiskExport(disk, uri, "dirty", bitmap=want, hash_manifest=False))
                full = False
                continue
            if want:
                reasons.append(f"{key}: bitmap {want} not offered; comparing hashes")
            exports.append(NbdDiskExport(disk, uri, "compare"))
            full = False
        return NbdSession(
            snapshot_id=self.snapshot_id or f"nbd-{uuid.uuid4().hex}",
            disks=exports,
            full=full,
            reason="; ".join(reasons),
            consistency=self.consistency,
        )
