"""Store: migrations fresh and upgrade, refusal of damaged and newer stores, backup, audit."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from appliance.errors import StoreError
from store import migrations as mig
from store.db import backup, integrity, open_store, schema_version
from store.records import audit, audit_verify


def digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_fresh_store_has_schema_and_pragmas(tmp_path: Path) -> None:
    db = open_store(tmp_path / "s.db")
    assert schema_version(db) == mig.migrations._migrations[-1].name  # every one applied
    for t in (
        "sources",
        "machines",
        "disks",
        "jobs",
        "sync_sessions",
        "sync_extents",
        "restore_points",
        "plans",
        "plan_runs",
        "events",
        "audit",
    ):
        assert t in db.table_names()
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_upgrade_applies_only_pending_migrations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "s.db"
    open_store(path).close()
    # A later version of the code adds a migration: opening applies just that one.
    newer = Migrations(mig.MIGRATION_SET)
    for m in mig.migrations._migrations:
        newer(name=m.name)(m.fn)

    @newer()
    def m999_add_note(db: Database) -> None:
        db.execute("ALTER TABLE machines ADD COLUMN note TEXT")

    monkeypatch.setattr("store.db.migrations", newer)
    db = open_store(path)
    assert schema_version(db) == "m999_add_note"
    assert "note" in db["machines"].columns_dict
    before = [m.name for m in mig.migrations._migrations]
    assert [m.name for m in newer.applied(db)] == [*before, "m999_add_note"]


def test_newer_schema_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = open_store(path)
    db.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
        "VALUES ('ferryman', 'm999_from_the_future', 'x')"
    )
    db.close()
    before = digest(path)
    with pytest.raises(StoreError, match="newer version"):
        open_store(path)
    assert digest(path) == before


@pytest.mark.row(15)
def test_damaged_store_is_refused_and_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"this is not a database" * 500)
    before = digest(path)
    with pytest.raises(StoreError, match=r"damaged|cannot open|failed"):
        open_store(path)
    assert digest(path) == before


def test_store_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="cannot create the store directory"):
        open_store(tmp_path / "file" / "state.db")


@pytest.mark.row(15)
def test_backup_is_consistent_copy(tmp_path: Path) -> None:
    db = open_store(tmp_path / "s.db")
    audit(db, "alice", "console", "source.add", {"name": "vc1"}, "ok")
    backup(db, tmp_path / "b.db")
    copy = sqlite3.connect(tmp_path / "b.db")
    assert copy.execute("SELECT who FROM audit").fetchone()[0] == "alice"
    assert (tmp_path / "b.db").stat().st_mode & 0o777 == 0o600
    with pytest.raises(StoreError, match="already exists"):
        backup(db, tmp_path / "b.db")
    assert integrity(db) == ["ok"]


def test_audit_chain_detects_edit_and_delete(tmp_path: Path) -> None:
    db = open_store(tmp_path / "s.db")
    for i in range(5):
        audit(db, "op", "ssh:10.0.0.9", f"action{i}", {"i": i}, "ok")
    assert audit_verify(db) == (True, "5 entries, chain intact")
    db.execute("UPDATE audit SET result='tampered' WHERE id=3")
    ok, why = audit_verify(db)
    assert not ok and why.startswith("audit entry 3") and "edited" in why
    db.execute("UPDATE audit SET result='ok' WHERE id=3")
    db.execute("DELETE FROM audit WHERE id=2")
    ok, why = audit_verify(db)
    assert not ok and why.startswith("audit entry 3") and "after entry 1" in why


@pytest.mark.row(15)
def test_torn_copy_is_refused(tmp_path: Path) -> None:
    """A store copied with cp that stopped halfway (or lost pages) is refused at start."""
    db = open_store(tmp_path / "s.db")
    for i in range(300):
        audit(db, "op", "console", "a", {"i": i, "pad": "x" * 500}, "ok")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    data = (tmp_path / "s.db").read_bytes()
    torn = tmp_path / "torn.db"
    torn.write_bytes(data[: len(data) // 2] + bytes(4096) + data[len(data) // 2 + 4096 :])
    before = digest(torn)
    with pytest.raises(StoreError, match=r"failed quick_check|damaged"):
        open_store(torn)
    assert digest(torn) == before
