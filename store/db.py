"""Open, check, migrate and back up the state store.

One connection per thread (sqlite3 objects must not cross threads). WAL so that readers (CLI,
TUI) never block the daemon's writes; synchronous=FULL so that an acknowledged commit
survives a power cut (reliability rows 13-15).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance.errors import StoreError
from store.migrations import MIGRATION_SET, migrations

BUSY_TIMEOUT_MS = 10_000  # a backup or a long reader may hold the lock for a moment


def now() -> str:
    """UTC timestamp with microseconds; sortable as text."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    try:
        conn = sqlite3.connect(
            uri,
            uri=True,
            timeout=BUSY_TIMEOUT_MS / 1000,
            check_same_thread=False,
            isolation_level=None,
        )
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        if not readonly:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error as e:
        raise StoreError(
            f"cannot open the state store {path}: {e}",
            hint="check that the directory exists and is writable by root, and that the "
            "file is a Ferryman store (restore one with: ferryman store restore FILE)",
        ) from e
    return conn


def check_dir(path: Path) -> None:
    """Refuse early, with the fix, when the store's directory cannot be used."""
    d = path.parent
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"cannot create the store directory {d}: {e.strerror}",
            hint="create it as root or pass --state-dir",
        ) from e
    if not os.access(d, os.R_OK | os.W_OK | os.X_OK):
        raise StoreError(
            f"the store directory {d} is not readable and writable",
            hint=f"fix its permissions (chmod 700 {d}) or pass --state-dir",
        )
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise StoreError(
            f"the state store {path} is not readable and writable",
            hint=f"fix its permissions (chmod 600 {path})",
        )


def _check_integrity(conn: sqlite3.Connection, path: Path, *, full: bool) -> None:
    pragma = "integrity_check" if full else "quick_check"
    try:
        rows = [r[0] for r in conn.execute(f"PRAGMA {pragma}")]
    except sqlite3.DatabaseError as e:
        raise StoreError(
            f"the state store {path} is damaged: {e}",
            hint="stop ferrymand and restore the last backup (ferryman store backup makes them)",
        ) from e
    if rows != ["ok"]:
        raise StoreError(
            f"the state store {path} failed {pragma}: {'; '.join(rows[:3])}",
            hint="stop ferrymand and restore the last backup (ferryman store backup makes them)",
        )


def _check_schema(db: Database, path: Path) -> None:
    known = {m.name for m in migrations._migrations}
    applied = [m.name for m in migrations.applied(db)]
    newer = [n for n in applied if n not in known]
    if newer:
        raise StoreError(
            f"the state store {path} has schema change '{newer[0]}' that this Ferryman does not "
            "know: it was written by a newer version",
            hint="run the newer Ferryman, or restore a backup made by this version",
        )


def open_store(path: Path, *, migrate: bool = True, full_check: bool = False) -> Database:
    """Open the store, refusing a damaged one or one with a newer schema; apply migrations.

    Nothing is written before both checks pass, so a refused store is left as it was.
    """
    check_dir(path)
    existed = path.exists() and path.stat().st_size > 0
    conn = _connect(path, readonly=False)
    if existed:
        _check_integrity(conn, path, full=full_check)
    db = Database(conn)
    _check_schema(db, path)
    if migrate:
        migrations.apply(db)
    return db


def open_readonly(path: Path) -> Database:
    """For displays (CLI, TUI) that read while the daemon writes."""
    if not path.exists():
        raise StoreError(
            f"no state store at {path}",
            hint="start ferrymand once to create it, or pass --state-dir",
        )
    db = Database(_connect(path, readonly=True))
    _check_schema(db, path)
    return db


def integrity(db: Database) -> list[str]:
    return [r[0] for r in db.execute("PRAGMA integrity_check")]


def backup(db: Database, dest: Path) -> None:
    """A consistent copy while the daemon writes (VACUUM INTO), never a file copy."""
    if dest.exists():
        raise StoreError(f"{dest} already exists", hint="choose a new file name")
    try:
        db.execute("VACUUM INTO ?", [str(dest)])
    except sqlite3.Error as e:
        raise StoreError(
            f"backup to {dest} failed: {e}", hint="check free space and that the directory exists"
        ) from e
    os.chmod(dest, 0o600)
    check = sqlite3.connect(dest)
    try:
        ok = [r[0] for r in check.execute("PRAGMA integrity_check")]
    finally:
        check.close()
    if ok != ["ok"]:
        raise StoreError(f"backup {dest} failed its integrity check", hint="try again")


def schema_version(db: Database) -> str:
    applied = migrations.applied(db)
    return applied[-1].name if applied else "empty"


# -- small typed helpers used across the engine -------------------------------------------


def dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def loads(text: str | None) -> Any:
    return json.loads(text) if text else None


@contextmanager
def write_txn(db: Database) -> Iterator[Database]:
    """A read-then-write transaction that takes the write lock up front (BEGIN IMMEDIATE).

    A plain BEGIN reads first and upgrades later; in WAL mode that upgrade fails at once with
    "database is locked" when another connection committed in between (busy_timeout does
    not help). IMMEDIATE waits for the lock instead.
    """
    if db.conn.in_transaction:  # nested: a savepoint inside the outer transaction
        with db.atomic():
            yield db
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


__all__ = [
    "MIGRATION_SET",
    "backup",
    "integrity",
    "now",
    "open_readonly",
    "open_store",
    "write_txn",
]
