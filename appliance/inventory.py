"""Sources and machines in the store: validation, discovery results, protection settings,
and the read models the CLI and TUI show (dashboard rows, machine detail)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlparse

from sqlite_utils import Database

from appliance.errors import Conflict, FerrymanError, NotFound
from appliance.sources.base import MachineInfo
from store.db import dumps, loads, now, write_txn

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
KINDS = ("libvirt", "nbd", "vsphere", "linux-agent")
SCHEMES = {
    "libvirt": ("qemu", "qemu+ssh", "qemu+tls", "qemu+tcp", "qemu+unix"),
    "nbd": ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock"),
    "vsphere": ("https",),
    "linux-agent": ("ssh",),
}
RPO_NEAR = 0.8  # newest point older than 80 % of the target: "near"
FAILED_SYNC_ALERT = 3  # consecutive failed syncs that raise an alert


class InventoryError(FerrymanError):
    code = "inventory"


def validate_name(name: str, what: str) -> str:
    if not NAME_RE.match(name or ""):
        raise InventoryError(
            f"{what} name '{name}' is not valid",
            hint="use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def validate_source(kind: str, uri: str, *, insecure: bool = False) -> None:
    if kind not in KINDS:
        raise InventoryError(f"unknown source kind '{kind}'", hint=f"one of: {', '.join(KINDS)}")
    scheme = urlparse(uri).scheme
    if scheme not in SCHEMES[kind]:
        raise InventoryError(
            f"'{uri}' is not a {kind} address",
            hint=f"it must start with {' or '.join(s + '://' for s in SCHEMES[kind])}",
        )
    if kind == "nbd" and scheme == "nbd" and not insecure:
        # Reached over a network: disk contents would cross it in clear text.
        raise InventoryError(
            f"'{uri}' reaches an NBD server over the network without TLS",
            hint="use nbds://USER@HOST/EXPORT?tls-psk-file=/root/keys.psk (TLS required), or add "
            "--insecure to accept clear text on a trusted link (recorded)",
        )


# -- sources ---------------------------------------------------------------------------------


def source_row(db: Database, name: str) -> dict[str, Any]:
    row = db.execute(
        "SELECT * FROM sources WHERE name=? OR CAST(id AS TEXT)=?", [name, name]
    ).fetchone()
    if row is None:
        raise NotFound(f"no source '{name}'", hint="list sources with: ferryman sources")
    cols = [d[0] for d in db.execute("SELECT * FROM sources LIMIT 0").description]
    src = dict(zip(cols, row, strict=True))
    src["params"] = loads(src["params"]) or {}
    return src


def list_sources(db: Database) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT s.id, s.name, s.kind, s.uri, s.params, s.tls_thumbprint, s.insecure, "
        "s.created_at, (SELECT count(*) FROM machines m WHERE m.source_id = s.id), "
        "(SELECT count(*) FROM machines m WHERE m.source_id = s.id AND m.protected) "
        "FROM sources s ORDER BY s.name"
    ).fetchall()
    keys = [
        "id",
        "name",
        "kind",
        "uri",
        "params",
        "tls_thumbprint",
        "insecure",
        "created_at",
        "machines",
        "protected",
    ]
    out = [dict(zip(keys, r, strict=True)) for r in rows]
    for s in out:
        s["params"] = loads(s["params"]) or {}
        s["insecure"] = bool(s["insecure"])
    return out


def list_sources_by_name(db: Database, name: str) -> dict[str, Any]:
    for s in list_sources(db):
        if s["name"] == name:
            return s
    raise NotFound(f"no source '{name}'", hint="list sources with: ferryman sources")


def insert_source(
    db: Database,
    *,
    name: str,
    kind: str,
    uri: str,
    params: dict[str, Any],
    credential_id: int | None,
    thumbprint: str | None,
    insecure: bool,
) -> dict[str, Any]:
    validate_name(name, "source")
    validate_source(kind, uri, insecure=insecure)
    with write_txn(db):
        if db.execute("SELECT 1 FROM sources WHERE name=?", [name]).fetchone():
            raise Conflict(
                f"a source named '{name}' already exists",
                hint="choose another name or remove the old one first",
            )
        db.execute(
            "INSERT INTO sources (name, kind, uri, params, credential_id, tls_thumbprint, "
            "insecure, created_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?)",
            [
                name,
                kind,
                uri,
                dumps(params),
                credential_id,
                thumbprint,
                int(insecure),
                now(),
                now(),
            ],
        )
    return source_row(db, name)


def delete_source(db: Database, name: str) -> dict[str, Any]:
    src = source_row(db, name)
    busy = db.execute(
        "SELECT m.name FROM machines m WHERE m.source_id=? AND m.protected", [src["id"]]
    ).fetchall()
    if busy:
        raise Conflict(
            f"source '{src['name']}' still has protected machines: "
            f"{', '.join(r[0] for r in busy[:5])}",
            hint="unprotect them first (ferryman unprotect NAME)",
        )
    with write_txn(db):
        db.execute("DELETE FROM machines WHERE source_id=?", [src["id"]])
        db.execute("DELETE FROM sources WHERE id=?", [src["id"]])
        if src.get("credential_id"):
            db.execute("DELETE FROM credentials WHERE id=?", [src["credential_id"]])
    return src


def record_discovery(db: Database, source_id: int, found: list[MachineInfo]) -> dict[str, int]:
    """Upsert what discovery found. Machines no longer seen are kept (their restore points
    matter) but marked 'missing'. Names are unique across sources: a clash gets a suffix."""
    added = updated = 0
    seen: list[str] = []
    with write_txn(db):
        for m in found:
            seen.append(m.ref)
            row = db.execute(
                "SELECT id FROM machines WHERE source_id=? AND ref=?", [source_id, m.ref]
            ).fetchone()
            fields = [
                m.power_state,
                m.guest_os,
                m.cpus,
                m.memory_mib,
                m.firmware,
                dumps(m.nics),
                dumps(m.details),
                now(),
            ]
            if row:
                mid = int(row[0])
                db.execute(
                    "UPDATE machines SET power_state=?, guest_os=?, cpus=?, memory_mib=?, "
                    "firmware=?, nics=?, details=?, discovered_at=? WHERE id=?",
                    [*fields, mid],
                )
                updated += 1
            else:
                name = (
                    m.name
                    if NAME_RE.match(m.name)
                    else re.sub(r"[^A-Za-z0-9._-]", "-", m.name)[:63] or "machine"
                )
                base, n = name, 1
                while db.execute("SELECT 1 FROM machines WHERE name=?", [name]).fetchone():
                    n += 1
                    name = f"{base[:58]}-{n}"
                cur = db.execute(
                    "INSERT INTO machines (source_id, ref, name, power_state, guest_os, cpus, "
                    "memory_mib, firmware, nics, details, discovered_at) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    [source_id, m.ref, name, *fields],
                )
                mid = int(cur.lastrowid or 0)
                added += 1
            keys = [d.key for d in m.disks]
            for d in m.disks:
                db.execute(
                    "INSERT INTO disks (machine_id, key, size, label, details) VALUES (?,?,?,?,?)"
                    " ON CONFLICT(machine_id, key) DO UPDATE SET size=excluded.size, "
                    "label=excluded.label, details=excluded.details",
                    [mid, d.key, d.size, d.label, dumps(d.details)],
                )
            key_marks = ",".join("?" * len(keys)) or "''"
            db.execute(
                f"DELETE FROM disks WHERE machine_id=? AND key NOT IN ({key_marks})",
                [mid, *keys],
            )
        marks = ",".join("?" * len(seen)) or "''"
        missing = db.execute(
            f"UPDATE machines SET power_state='missing' WHERE source_id=? AND ref NOT IN ({marks})",
            [source_id, *seen],
        ).rowcount
    return {"added": added, "updated": updated, "missing": missing}


# -- machines --------------------------------------------------------------------------------


def machine_row(db: Database, name: str) -> dict[str, Any]:
    row = db.execute(
        "SELECT * FROM machines WHERE name=? OR CAST(id AS TEXT)=?", [name, name]
    ).fetchone()
    if row is None:
        raise NotFound(
            f"no machine '{name}'",
            hint="list machines with: ferryman machines (discover a source first)",
        )
    cols = [d[0] for d in db.execute("SELECT * FROM machines LIMIT 0").description]
    m = dict(zip(cols, row, strict=True))
    m["nics"] = loads(m["nics"]) or []
    m["details"] = loads(m["details"]) or {}
    m["protected"] = bool(m["protected"])
    m["verify_every_sync"] = bool(m["verify_every_sync"])
    return m


def set_protection(
    db: Database,
    name: str,
    *,
    protected: bool | None = None,
    rpo_seconds: int | None = None,
    throttle_bps: int | None = None,
    verify_every_sync: bool | None = None,
    clear_throttle: bool = False,
) -> dict[str, Any]:
    m = machine_row(db, name)
    if rpo_seconds is not None and rpo_seconds < 60:
        raise InventoryError(
            f"RPO {rpo_seconds} s for '{m['name']}' is too short", hint="use at least 60 seconds"
        )
    if throttle_bps is not None and throttle_bps < 64 * 1024:
        raise InventoryError(
            f"throttle {throttle_bps} B/s for '{m['name']}' is too low",
            hint="use at least 64 KiB/s (65536), or no throttle",
        )
    if protected and m["cutover_done"]:
        raise Conflict(
            f"'{m['name']}' was cut over; it is not replicated any more",
            hint="protect the new machine instead",
        )
    sets, args = [], []
    for col, val in (
        ("protected", protected),
        ("rpo_seconds", rpo_seconds),
        ("throttle_bps", throttle_bps),
        ("verify_every_sync", verify_every_sync),
    ):
        if val is not None:
            sets.append(f"{col}=?")
            args.append(int(val) if isinstance(val, bool) else val)
    if clear_throttle:
        sets.append("throttle_bps=NULL")
    if sets:
        db.execute(f"UPDATE machines SET {', '.join(sets)} WHERE id=?", [*args, m["id"]])
    return machine_row(db, str(m["id"]))


def _age_s(ts: str | None) -> float | None:
    if not ts:
        return None
    return (datetime.now(UTC) - datetime.fromisoformat(ts)).total_seconds()


def rpo_status(age_s: float | None, rpo_seconds: int | None) -> str:
    if not rpo_seconds:
        return "none"
    if age_s is None:
        return "over"
    if age_s > rpo_seconds:
        return "over"
    return "near" if age_s > RPO_NEAR * rpo_seconds else "within"


def failed_syncs(db: Database, machine_id: int) -> int:
    """Consecutive failed syncs, newest first, stopping at the first success."""
    n = 0
    for (state,) in db.execute(
        "SELECT state FROM jobs WHERE machine_id=? AND kind='sync' AND state IN "
        "('succeeded','failed','interrupted') ORDER BY id DESC LIMIT 20",
        [machine_id],
    ):
        if state == "succeeded":
            break
        n += 1
    return n


def machines_overview(db: Database) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT m.id, m.name, s.name, s.kind, m.power_state, m.guest_os, m.cpus, m.memory_mib,"
        " m.protected, m.rpo_seconds, m.throttle_bps, m.cutover_done, "
        " (SELECT count(*) FROM disks d WHERE d.machine_id=m.id), "
        " (SELECT coalesce(sum(size),0) FROM disks d WHERE d.machine_id=m.id) "
        "FROM machines m JOIN sources s ON s.id = m.source_id ORDER BY m.name"
    ).fetchall()
    newest = {
        r[0]: (r[1], r[2])
        for r in db.execute(
            "SELECT machine_id, id, max(source_time) FROM restore_points WHERE state='sealed' "
            "GROUP BY machine_id"
        )
    }
    counts = dict(
        db.execute(
            "SELECT machine_id, count(*) FROM restore_points "
            "WHERE state='sealed' GROUP BY machine_id"
        ).fetchall()
    )
    active = {
        r[0]: {"id": r[1], "kind": r[2], "state": r[3], "progress": loads(r[4]) or {}}
        for r in db.execute(
            "SELECT machine_id, id, kind, state, progress FROM jobs "
            "WHERE state IN ('queued','running') AND machine_id IS NOT "
            "NULL"
        )
    }
    out = []
    for (
        mid,
        name,
        source,
        kind,
        power,
        guest,
        cpus,
        mem,
        protected,
        rpo,
        throttle,
        cut,
        ndisks,
        size,
    ) in rows:
        rp = newest.get(mid)
        age = _age_s(rp[1]) if rp else None
        out.append(
            {
                "id": mid,
                "name": name,
                "source": source,
                "source_kind": kind,
                "power_state": power,
                "guest_os": guest,
                "cpus": cpus,
                "memory_mib": mem,
                "protected": bool(protected),
                "rpo_seconds": rpo,
                "throttle_bps": throttle,
                "cutover_done": bool(cut),
                "disks": ndisks,
                "size": size,
                "restore_points": counts.get(mid, 0),
                "newest_rp": {"id": rp[0], "source_time": rp[1], "age_s": age} if rp else None,
                "rpo_status": rpo_status(age, rpo) if protected else "none",
                "active_job": active.get(mid),
                "failed_syncs": failed_syncs(db, mid),
            }
        )
    return out


def restore_points(db: Database, machine_id: int) -> list[dict[str, Any]]:
    cols = [d[0] for d in db.execute("SELECT * FROM restore_points LIMIT 0").description]
    rps = [
        dict(zip(cols, r, strict=True))
        for r in db.execute(
            "SELECT * FROM restore_points WHERE machine_id=? AND state='sealed' ORDER BY id",
            [machine_id],
        )
    ]
    for rp in rps:
        rp["token"] = loads(rp["token"]) or {}
        rp["inspection"] = loads(rp["inspection"])
        rp["boot_report"] = loads(rp.get("boot_report"))  # appliance/bootverify.py
        rp["disks"] = [
            {"disk_key": k, "path": p, "size": s, "manifest": mf}
            for k, p, s, mf in db.execute(
                "SELECT disk_key, path, size, manifest FROM restore_point_disks "
                "WHERE restore_point_id=? ORDER BY disk_key",
                [rp["id"]],
            )
        ]
    return rps


def machine_detail(db: Database, name: str) -> dict[str, Any]:
    m = machine_row(db, name)
    m["source"] = db.execute("SELECT name FROM sources WHERE id=?", [m["source_id"]]).fetchone()[0]
    m["disks"] = [
        {"key": k, "size": s, "label": lb, "details": loads(d) or {}}
        for k, s, lb, d in db.execute(
            "SELECT key, size, label, details FROM disks WHERE machine_id=? ORDER BY key", [m["id"]]
        )
    ]
    m["restore_points"] = restore_points(db, m["id"])
    m["jobs"] = [
        {
            "id": i,
            "kind": k,
            "state": s,
            "created_at": c,
            "ended_at": e,
            "error": err,
            "result": loads(res),
        }
        for i, k, s, c, e, err, res in db.execute(
            "SELECT id, kind, state, created_at, ended_at, error, result FROM jobs "
            "WHERE machine_id=? ORDER BY id DESC LIMIT 30",
            [m["id"]],
        )
    ]
    m["failed_syncs"] = failed_syncs(db, m["id"])
    newest = m["restore_points"][-1] if m["restore_points"] else None
    age = _age_s(newest["source_time"]) if newest else None
    m["rpo_status"] = rpo_status(age, m["rpo_seconds"]) if m["protected"] else "none"
    m["achieved_rpo_s"] = age
    return m
