"""`ferryman support-bundle`: logs, doctor output and a store summary; never a secret (row 23)."""

from __future__ import annotations

import argparse
import json
import sqlite3
import tarfile
from pathlib import Path

import pytest

from appliance import support
from appliance.cli import verbs_support
from store.db import open_store
from store.records import add_event
from store.secrets import KEY_NAME, Vault
from tests.helpers.daemon import Env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

CANARY = "Canary-S3cret-7f1c9e"


def _seed(env: Env) -> bytes:
    """A store with a credential (the canary, encrypted) and a source using it; a log line."""
    db = open_store(env.db)
    cred = Vault(env.state_dir / "secret.key").put(db, "vc01", "migrate@vsphere.local", CANARY)
    db.execute(
        "INSERT INTO sources (name, kind, uri, credential_id, created_at, updated_at) "
        "VALUES ('vc01', 'vsphere', 'https://vc01.example', ?, 'now', 'now')",
        [cred],
    )
    add_event(db, "source vc01 added")
    token = bytes(db.execute("SELECT secret FROM credentials").fetchone()[0])
    db.close()
    log_dir = Path(env.vars()["FERRYMAN_LOG_DIR"])
    log_dir.mkdir(parents=True)
    (log_dir / "ferrymand.log").write_text(
        "2026-11-26 INFO ferrymand: started\n"
        f"2026-11-26 DEBUG helper argv: --user root --password={CANARY}\n"
        f"2026-11-26 DEBUG leaked token {token.decode()}\n"
    )
    return token


def _members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {
            m.name.split("/", 1)[1]: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


def _run_verb(*argv: str) -> dict[str, object]:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true")
    parser = argparse.ArgumentParser()
    verbs_support.register(parser.add_subparsers(dest="verb"), common)
    args = parser.parse_args(["support-bundle", "--json", *argv])
    out = args.handler(args)
    assert out.exit_code == 0
    return dict(out.data)


def test_bundle_has_logs_doctor_store_and_no_secret(fm_env: Env, tmp_path: Path) -> None:
    token = _seed(fm_env)
    # The vault key however it is kept (sealed by systemd-creds where that works, else a
    # root-only file), and the files that hold it.
    vault = Vault(fm_env.state_dir / KEY_NAME)
    assert vault.backend != "none"
    key = vault._load()
    key_files = [f.read_bytes() for f in (vault.key_path, vault.sealed_path) if f.exists()]
    outdir = tmp_path / "out"
    outdir.mkdir()
    data = _run_verb("--output", str(outdir))
    bundle = Path(str(data["file"]))
    assert bundle.parent == outdir and bundle.name.endswith(".tar.gz")
    assert bundle.stat().st_mode & 0o777 == 0o600
    files = _members(bundle)
    for want in (
        "README.txt",
        "summary.json",
        "doctor.json",
        "store/summary.json",
        "store/state-sanitized.db",
        "logs/ferryman/ferrymand.log",
        "system/uname.txt",
    ):
        assert want in files, (want, sorted(files))

    # Never a secret: not the canary, not its encrypted token, not the key, in any member.
    for name, content in files.items():
        for secret in (CANARY.encode(), token, key, *key_files):
            assert secret not in content, f"{name} holds a secret"
    log = files["logs/ferryman/ferrymand.log"].decode()
    assert "--password=[REDACTED]" in log and "[REDACTED-TOKEN]" in log and "started" in log

    # The store summary counts rows, and the sanitized copy is a real store without credentials.
    summary = json.loads(files["store/summary.json"])
    assert summary["integrity"] == ["ok"] and summary["schema"] != "empty"
    assert summary["rows"]["sources"] == 1 and summary["rows"]["credentials"] == 1
    copy = tmp_path / "copy.db"
    copy.write_bytes(files["store/state-sanitized.db"])
    conn = sqlite3.connect(copy)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "credentials" not in tables and "sources" in tables
        assert conn.execute("SELECT name FROM sources").fetchall() == [("vc01",)]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()

    doctor = json.loads(files["doctor.json"])
    parts = {c["part"]: c for c in doctor["checks"]}
    assert parts["state store"]["verdict"] == "ok"
    assert parts["ferrymand"]["verdict"] == "warn"  # no daemon in this test: a warning, not a gap
    meta = json.loads(files["summary.json"])
    assert meta["versions"]["ferryman"] and isinstance(meta["notes"], list)
    assert set(data["members"]) == {f"{bundle.name.removesuffix('.tar.gz')}/{n}" for n in files}


def test_summary_only_and_refusals(fm_env: Env, tmp_path: Path) -> None:
    _seed(fm_env)
    target = tmp_path / "b.tar.gz"
    b = support.collect(target, store_copy=False)
    files = _members(b.file)
    assert "store/summary.json" in files and "store/state-sanitized.db" not in files
    with pytest.raises(support.SupportBundleError, match="already exists"):
        support.collect(target)
    with pytest.raises(support.SupportBundleError, match="cannot write"):
        support.collect(tmp_path / "missing-dir" / "x.tar.gz")


def test_no_store_yet_is_a_note_not_a_failure(fm_env: Env, tmp_path: Path) -> None:
    b = support.collect(tmp_path)
    assert any("no state store" in n for n in b.notes)
    assert "doctor.json" in _members(b.file)


def test_redact_blanks_assignments_and_tokens() -> None:
    raw = b'password: hunter2 {"token": "abc"} cookie=vmware_soap_session ok gAAAAA' + b"x" * 60
    out = support.redact(raw)
    assert b"hunter2" not in out and b"abc" not in out and b"vmware_soap" not in out
    assert out.count(b"[REDACTED]") == 3 and b"[REDACTED-TOKEN]" in out and b" ok " in out
