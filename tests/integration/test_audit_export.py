"""`ferryman audit export`: the audit trail with its chain hashes, as JSON lines or CSV, that
the customer can re-verify with Ferryman (`audit verify --export`) or with nothing but
sha256 (the recipe in docs/security.md, done here with hashlib); an edited or deleted line
is named; --since exports a verifiable piece of the chain; the export itself is audited."""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import Daemon, Env, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def cli(env: Env, *args: str, code: int = 0) -> dict[str, Any]:
    r = run_cli(env, *args, "--json", timeout=120)
    assert r.returncode == code, r.stdout + r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def recipe(rows: list[dict[str, Any]]) -> None:
    """The customer's own check: each hash is sha256 of the JSON array
    [prev_hash, ts, who, origin, action, params, result] (no spaces, UTF-8), and each
    prev_hash is the hash of the line before."""
    prev = rows[0]["prev_hash"]
    for r in rows:
        assert r["prev_hash"] == prev
        text = json.dumps(
            [r["prev_hash"], r["ts"], r["who"], r["origin"], r["action"], r["params"], r["result"]],
            separators=(",", ":"),
        )
        assert hashlib.sha256(text.encode()).hexdigest() == r["hash"], r
        prev = r["hash"]


def test_audit_export_reverified_by_the_customer(
    daemon: Daemon, fm_env: Env, tmp_path: Path
) -> None:
    # A few actions: a source added and removed, a login, the cutover policy set twice.
    cli(
        fm_env,
        "source",
        "add",
        "lab",
        "--kind",
        "nbd",
        "--uri",
        "nbd+unix:///?socket=/x",
        "--no-test",
    )
    cli(fm_env, "source", "remove", "lab")
    with fm_env.client() as c:
        c.login()
    cli(fm_env, "cutover", "policy", "--two-operators", "on")
    cli(fm_env, "cutover", "policy", "--two-operators", "off")

    out = cli(fm_env, "audit", "export", "--to", str(tmp_path / "audit.jsonl"))
    assert out["format"] == "jsonl" and out["ok"] is True and out["entries"] >= 4, (
        tmp_path / "audit.jsonl"
    ).read_text()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    assert len(rows) == out["entries"] and rows[0]["id"] == 1
    assert rows[0]["prev_hash"] == "0" * 64
    recipe(rows)
    actions = [r["action"] for r in rows]
    assert "source.add" in actions and "login" in actions and "cutover.policy" in actions

    csv_out = cli(fm_env, "audit", "export", "--to", str(tmp_path / "audit.csv"))
    assert csv_out["format"] == "csv"
    with open(tmp_path / "audit.csv", newline="") as f:
        crow = list(csv.DictReader(f))
    assert [int(r["id"]) for r in crow][: len(rows)] == [r["id"] for r in rows]
    recipe(crow)
    for name in ("audit.jsonl", "audit.csv"):
        v = cli(fm_env, "audit", "verify", "--export", str(tmp_path / name))
        assert v["ok"] is True and "chain intact" in v["detail"]

    # The customer's copy edited in one place, or with one line taken out: named.
    edited = [dict(r) for r in rows]
    edited[2]["result"] = "ok (quietly changed)"
    (tmp_path / "edited.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    v = cli(fm_env, "audit", "verify", "--export", str(tmp_path / "edited.jsonl"), code=1)
    assert v["detail"] == f"audit entry {rows[2]['id']}: content does not match its hash (edited)"
    (tmp_path / "cut.jsonl").write_text(
        "".join(lines[i] + "\n" for i in range(len(lines)) if i != 1)
    )
    v = cli(fm_env, "audit", "verify", "--export", str(tmp_path / "cut.jsonl"), code=1)
    assert v["detail"] == (
        f"audit entry {rows[2]['id']}: chain broken after entry {rows[0]['id']} (deleted?)"
    )

    # --since: a piece of the chain, intact on its own and anchored by its first prev_hash.
    since = rows[2]["ts"]
    part = cli(fm_env, "audit", "export", "--to", str(tmp_path / "since.jsonl"), "--since", since)
    prow = [json.loads(x) for x in (tmp_path / "since.jsonl").read_text().splitlines()]
    assert prow[0]["id"] == rows[2]["id"] and prow[0]["prev_hash"] == rows[1]["hash"]
    assert part["ok"] is True and f"({rows[2]['id']}.." in part["detail"]
    recipe(prow)
    bad = run_cli(fm_env, "audit", "export", "--to", str(tmp_path / "x"), "--since", "yesterday")
    assert bad.returncode == 1 and "'yesterday' is not a date or time" in bad.stdout + bad.stderr

    # Every export is itself in the trail, and the live chain is intact.
    with fm_env.client() as c:
        mine = [a for a in c.audit(500) if a["action"] == "audit.export"]
    assert len(mine) == 3 and mine[0]["who"] == "root" and mine[0]["origin"] == "console"
    assert cli(fm_env, "audit", "verify")["ok"] is True
    con = sqlite3.connect(fm_env.db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
