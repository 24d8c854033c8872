"""Small, typed writes and reads shared by the daemon, the CLI and the TUI.

Kept as plain functions over a sqlite-utils Database: each opens its own transaction when it
writes more than one row.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sqlite_utils import Database

from store.db import dumps, loads, now, write_txn

GENESIS = "0" * 64  # prev_hash of the first audit entry


def add_event(
    db: Database,
    message: str,
    *,
    level: str = "info",
    kind: str = "daemon",
    machine_id: int | None = None,
    job_id: int | None = None,
    details: dict[str, Any] | None = None,
) -> int:
    cur = db.execute(
        "INSERT INTO events (ts, level, kind, machine_id, job_id, message, details) "
        "VALUES (?,?,?,?,?,?,?)",
        [now(), level, kind, machine_id, job_id, message, dumps(details or {})],
    )
    return int(cur.lastrowid or 0)


def events(
    db: Database, *, since_id: int = 0, machine_id: int | None = None, limit: int = 200
) -> list[dict[str, Any]]:
    where, args = "id > ?", [since_id]
    if machine_id is not None:
        where += " AND machine_id = ?"
        args.append(machine_id)
    rows = db.execute(
        f"SELECT * FROM (SELECT * FROM events WHERE {where} ORDER BY id DESC LIMIT ?) ORDER BY id",
        [*args, limit],
    ).fetchall()
    cols = ["id", "ts", "level", "kind", "machine_id", "job_id", "message", "details"]
    out = [dict(zip(cols, r, strict=True)) for r in rows]
    for e in out:
        e["details"] = loads(e["details"])
    return out


def get_setting(db: Database, key: str, default: Any = None) -> Any:
    row = db.execute("SELECT value FROM settings WHERE key = ?", [key]).fetchone()
    return loads(row[0]) if row else default


def set_setting(db: Database, key: str, value: Any) -> None:
    db.execute(
        "INSERT INTO settings (key, value, updated_at) VALUES (?,?,?) "
        "ON CONFLICT(key) DO UPDATE SET value = excluded.value, updated_at = excluded.updated_at",
        [key, dumps(value), now()],
    )


# -- audit trail -----------------------------------------------------------------------------


def _audit_hash(
    prev: str, ts: str, who: str, origin: str, action: str, params: str, result: str
) -> str:
    canonical = dumps([prev, ts, who, origin, action, params, result])
    return hashlib.sha256(canonical.encode()).hexdigest()


def audit(
    db: Database, who: str, origin: str, action: str, params: dict[str, Any], result: str
) -> int:
    """Append one entry to the hash-chained audit log. ``params`` must hold no secrets."""
    with write_txn(db):
        row = db.execute("SELECT hash FROM audit ORDER BY id DESC LIMIT 1").fetchone()
        prev = row[0] if row else GENESIS
        ts, p = now(), dumps(params)
        h = _audit_hash(prev, ts, who, origin, action, p, result)
        cur = db.execute(
            "INSERT INTO audit (ts, who, origin, action, params, result, prev_hash, hash) "
            "VALUES (?,?,?,?,?,?,?,?)",
            [ts, who, origin, action, p, result, prev, h],
        )
        return int(cur.lastrowid or 0)


AUDIT_COLUMNS = ("id", "ts", "who", "origin", "action", "params", "result", "prev_hash", "hash")


def audit_entries(db: Database, since: str | None = None) -> list[dict[str, Any]]:
    """Every audit entry (``since``: ISO time, entries at or after it), oldest first, with the
    stored text of its params and both hashes, so a copy can be verified on its own."""
    where, args = ("WHERE ts >= ?", [since]) if since else ("", [])
    rows = db.execute(
        f"SELECT {', '.join(AUDIT_COLUMNS)} FROM audit {where} ORDER BY id", args
    ).fetchall()
    return [dict(zip(AUDIT_COLUMNS, r, strict=True)) for r in rows]


def verify_entries(rows: list[dict[str, Any]], *, from_genesis: bool = True) -> tuple[bool, str]:
    """Walk a chain of entries; name the first one edited, or after which one was deleted.
    ``from_genesis`` False: the rows may start anywhere (an export made with --since)."""
    prev = GENESIS if from_genesis or not rows else str(rows[0]["prev_hash"])
    last_id = int(rows[0]["id"]) - 1 if rows and not from_genesis else 0
    for r in rows:
        rid = int(r["id"])
        if r["prev_hash"] != prev:
            return False, f"audit entry {rid}: chain broken after entry {last_id} (deleted?)"
        computed = _audit_hash(
            r["prev_hash"], r["ts"], r["who"], r["origin"], r["action"], r["params"], r["result"]
        )
        if computed != r["hash"]:
            return False, f"audit entry {rid}: content does not match its hash (edited)"
        prev, last_id = r["hash"], rid
    if not from_genesis and rows:
        return True, (
            f"{len(rows)} entries ({rows[0]['id']}..{last_id}), chain intact, last hash {prev}"
        )
    return True, f"{last_id} entries, chain intact"


def audit_verify(db: Database) -> tuple[bool, str]:
    """Walk the chain; name the first entry that was edited, or after which one was deleted."""
    return verify_entries(audit_entries(db))
