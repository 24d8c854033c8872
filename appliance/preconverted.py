"""Pre-converted restore points: the converted overlays kept of each machine's newest bootable
point, so that a failover to that point boots at once (RTO = boot time, no conversion).

A boot verification (appliance/bootverify.py) converts a point onto overlays under
``<volume store>/preconverted/machine-N/``. When the point boots, its overlays are kept here as
the machine's 'current' pre-converted point and the previous one is 'retired'. Each overlay
holds a reader on its chain point (holder ``converted overlay <file>``, like the overlays of
``ferryman convert``), so retention never merges the point under it.

A retired overlay is deleted only when nothing else reads its point (a test run or a cutover
may have booted an overlay backed by it); until then ``collect`` leaves it and tries again.

A test run or cutover uses a pre-converted point only when it was converted exactly as the
plan would convert it: same backend, same customisation (host name, addresses, MACs). That
is what ``custom_key`` compares.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance.config import paths
from appliance.conversion_jobs import OVERLAY_HOLDER
from appliance.datapath.chain import DiskChain
from store.db import dumps, loads, now, write_txn

log = logging.getLogger(__name__)


def machine_dir(machine_id: int) -> Path:
    return paths().volume_dir / "preconverted" / f"machine-{machine_id}"


def custom_key(backend: str, custom: dict[str, Any] | None) -> str:
    """What makes two conversions of one point interchangeable."""
    text = json.dumps({"backend": backend, "custom": custom or {}}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _row(r: tuple[Any, ...], cols: list[str]) -> dict[str, Any]:
    out = dict(zip(cols, r, strict=True))
    out["disks"] = loads(out["disks"]) or []
    return out


def _select(db: Database, where: str, args: list[Any]) -> list[dict[str, Any]]:
    cur = db.execute(f"SELECT * FROM preconverted WHERE {where} ORDER BY id", args)
    cols = [d[0] for d in cur.description]
    return [_row(r, cols) for r in cur.fetchall()]


def current(db: Database, machine_id: int) -> dict[str, Any] | None:
    rows = _select(db, "machine_id=? AND state='current'", [machine_id])
    return rows[0] if rows else None


def listing(db: Database) -> list[dict[str, Any]]:
    rows = _select(db, "1=1", [])
    for r in rows:
        name = db.execute("SELECT name FROM machines WHERE id=?", [r["machine_id"]]).fetchone()
        r["machine"] = name[0] if name else None
    return rows


def usable(db: Database, machine_id: int, rp_id: int, key: str) -> dict[str, Any] | None:
    """The current pre-converted overlays of this point, if converted the way ``key`` says
    and still on disk; None otherwise."""
    cur = current(db, machine_id)
    if cur is None or cur["restore_point_id"] != rp_id or cur["custom_key"] != key:
        return None
    if not all(Path(d["path"]).exists() for d in cur["disks"]):
        return None
    return cur


def staging_path(machine_id: int, rp_id: int, disk_key: str, job_id: int) -> Path:
    """One file per verification: verifying a point again never touches the kept one."""
    return machine_dir(machine_id) / f"rp{rp_id}-job{job_id}-{disk_key}.qcow2"


def hold(chain: DiskChain, point: str, overlay: Path) -> str:
    """A reader that lasts as long as the overlay file (see conversion_jobs)."""
    return chain.add_reader(point, f"{OVERLAY_HOLDER}{overlay}")


def release(disks: list[dict[str, Any]]) -> None:
    """Delete overlay files and their readers."""
    for d in disks:
        Path(d["path"]).unlink(missing_ok=True)
        DiskChain(Path(d["chain"])).remove_reader(d["point"], d["reader"])


def keep(
    db: Database,
    machine_id: int,
    rp_id: int,
    disks: list[dict[str, Any]],
    *,
    backend: str,
    key: str,
    plan: str | None,
    convert_seconds: float | None,
    boot_seconds: float | None,
) -> list[str]:
    """Make these overlays the machine's current pre-converted point; retire the previous.
    Returns what ``collect`` deleted."""
    with write_txn(db):
        db.execute(
            "UPDATE preconverted SET state='retired' WHERE machine_id=? AND state='current'",
            [machine_id],
        )
        db.execute(
            "INSERT INTO preconverted (machine_id, restore_point_id, state, disks, backend, "
            "custom_key, plan, convert_seconds, boot_seconds, created_at) "
            "VALUES (?,?,'current',?,?,?,?,?,?,?)",
            [
                machine_id,
                rp_id,
                dumps(disks),
                backend,
                key,
                plan,
                convert_seconds,
                boot_seconds,
                now(),
            ],
        )
    return collect(db)


def drop(db: Database, machine_id: int) -> list[str]:
    """Retire the current pre-converted point of a machine (the operator's choice)."""
    db.execute(
        "UPDATE preconverted SET state='retired' WHERE machine_id=? AND state='current'",
        [machine_id],
    )
    return collect(db)


def _busy(disks: list[dict[str, Any]]) -> str | None:
    """Who else reads the point these overlays are backed by (a run may use them)."""
    for d in disks:
        chain = DiskChain(Path(d["chain"]))
        try:
            readers = chain.readers(d["point"])
        except OSError:
            continue
        for r in readers:
            holder = str(r.get("holder", ""))
            if r["id"] != d["reader"] and not holder.startswith(OVERLAY_HOLDER):
                return holder
    return None


def collect(db: Database) -> list[str]:
    """Delete retired overlays nothing reads any more; returns the files deleted."""
    out: list[str] = []
    for r in _select(db, "state='retired'", []):
        who = _busy(r["disks"])
        if who is not None:
            log.info("retired pre-converted point %s kept: read by %s", r["restore_point_id"], who)
            continue
        release(r["disks"])
        db.execute("DELETE FROM preconverted WHERE id=?", [r["id"]])
        out += [d["path"] for d in r["disks"]]
    return out
