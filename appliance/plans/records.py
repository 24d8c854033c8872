"""Plans and plan runs in the store: versions, diffs, run rows and their reports.

A plan is saved as a new version only when its document changes (canonical JSON: sorted keys),
so saving the same file twice is harmless and ``plan diff`` shows real edits only. Versions
are never edited or deleted: a run names the exact version it used.
"""

from __future__ import annotations

import difflib
import json
from typing import Any

from sqlite_utils import Database

from appliance.errors import NotFound
from appliance.plans.model import Inventory, check_document
from store.db import dumps, loads, now, write_txn

ACTIVE_TEST = ("queued", "running", "cleaning")
# Cutover runs stay open (awaiting the operator) until committed or rolled back.
DONE_CUTOVER = ("committed", "rolled-back", "failed-rolled-back")


def canonical(doc: dict[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, indent=2)


def save(db: Database, name: str, doc: dict[str, Any], who: str = "") -> dict[str, Any]:
    """Validate against the store and keep as a new version if it differs from the newest."""
    if isinstance(doc, dict) and "name" not in doc:
        doc = {**doc, "name": name}
    check_document(doc, Inventory.from_db(db))
    if doc["name"] != name:
        from appliance.plans.errors import PlanInvalid, Problem

        raise PlanInvalid(
            name,
            [Problem("$.name", f"the document is named '{doc['name']}'", f'set "name": "{name}"')],
        )
    text = canonical(doc)
    with write_txn(db):
        row = db.execute(
            "SELECT id, version, document FROM plans WHERE name=? ORDER BY version DESC LIMIT 1",
            [name],
        ).fetchone()
        if row and canonical(loads(row[2])) == text:
            return {**get(db, name, row[1]), "unchanged": True}
        version = (row[1] + 1) if row else 1
        db.execute(
            "INSERT INTO plans (name, version, document, created_at, created_by) "
            "VALUES (?,?,?,?,?)",
            [name, version, text, now(), who],
        )
    return {**get(db, name, version), "unchanged": False}


def get(db: Database, name: str, version: int | None = None) -> dict[str, Any]:
    if version is None:
        row = db.execute(
            "SELECT id, name, version, document, created_at, created_by FROM plans "
            "WHERE name=? ORDER BY version DESC LIMIT 1",
            [name],
        ).fetchone()
    else:
        row = db.execute(
            "SELECT id, name, version, document, created_at, created_by FROM plans "
            "WHERE name=? AND version=?",
            [name, version],
        ).fetchone()
    if row is None:
        what = f"plan '{name}'" + (f" version {version}" if version is not None else "")
        raise NotFound(f"no {what}", hint="list plans with: ferryman plan list")
    keys = ["id", "name", "version", "document", "created_at", "created_by"]
    out = dict(zip(keys, row, strict=True))
    out["document"] = loads(out["document"])
    return out


def by_id(db: Database, plan_id: int) -> dict[str, Any]:
    row = db.execute("SELECT name, version FROM plans WHERE id=?", [plan_id]).fetchone()
    if row is None:
        raise NotFound(f"no plan with id {plan_id}", hint="list plans with: ferryman plan list")
    return get(db, row[0], row[1])


def list_plans(db: Database) -> list[dict[str, Any]]:
    rows = db.execute(
        "SELECT name, max(version), count(*), max(created_at) FROM plans GROUP BY name "
        "ORDER BY name"
    ).fetchall()
    out = []
    for name, version, count, updated in rows:
        last = db.execute(
            "SELECT r.id, r.kind, r.state, r.started_at FROM plan_runs r JOIN plans p "
            "ON p.id=r.plan_id WHERE p.name=? ORDER BY r.id DESC LIMIT 1",
            [name],
        ).fetchone()
        out.append(
            {
                "name": name,
                "version": version,
                "versions": count,
                "updated_at": updated,
                "last_run": dict(zip(["id", "kind", "state", "started_at"], last, strict=True))
                if last
                else None,
            }
        )
    return out


def diff(db: Database, name: str, a: int | None = None, b: int | None = None) -> dict[str, Any]:
    """Changes from version a (default: the one before b) to b (default: the newest)."""
    new = get(db, name, b)
    if a is None:
        a = new["version"] - 1
        if a < 1:
            a = new["version"]
    old = get(db, name, a)
    lines = list(
        difflib.unified_diff(
            canonical(old["document"]).splitlines(),
            canonical(new["document"]).splitlines(),
            fromfile=f"{name} v{old['version']}",
            tofile=f"{name} v{new['version']}",
            lineterm="",
        )
    )
    return {
        "name": name,
        "from": old["version"],
        "to": new["version"],
        "changes": structural_changes(old["document"], new["document"]),
        "unified": "\n".join(lines),
    }


def structural_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per change, in plan terms: machines and networks added, removed, edited."""
    out: list[str] = []
    for coll, key in (("machines", "machine"), ("networks", "name")):
        o = {x[key]: x for x in old.get(coll, [])}
        n = {x[key]: x for x in new.get(coll, [])}
        for k in sorted(n.keys() - o.keys()):
            out.append(f"{coll}: added {k}")
        for k in sorted(o.keys() - n.keys()):
            out.append(f"{coll}: removed {k}")
        for k in sorted(o.keys() & n.keys()):
            for field in sorted(o[k].keys() | n[k].keys()):
                if o[k].get(field) != n[k].get(field):
                    out.append(
                        f"{coll}: {k}.{field}: {dumps(o[k].get(field))} -> {dumps(n[k].get(field))}"
                    )
    for field in ("hooks", "description"):
        if old.get(field) != new.get(field):
            out.append(f"{field} changed")
    return out


# -- runs --------------------------------------------------------------------------------------


def create_run(db: Database, plan_id: int, kind: str, state: str, step: str = "") -> int:
    cur = db.execute(
        "INSERT INTO plan_runs (plan_id, kind, state, step, started_at, report) "
        "VALUES (?,?,?,?,?,?)",
        [plan_id, kind, state, step, now(), dumps({})],
    )
    return int(cur.lastrowid or 0)


def run(db: Database, run_id: int) -> dict[str, Any]:
    row = db.execute(
        "SELECT r.id, r.plan_id, p.name, p.version, r.kind, r.state, r.step, r.started_at, "
        "r.ended_at, r.report FROM plan_runs r JOIN plans p ON p.id=r.plan_id WHERE r.id=?",
        [run_id],
    ).fetchone()
    if row is None:
        raise NotFound(f"no plan run {run_id}", hint="list runs with: ferryman testrun list")
    keys = [
        "id",
        "plan_id",
        "plan",
        "version",
        "kind",
        "state",
        "step",
        "started_at",
        "ended_at",
        "report",
    ]
    out = dict(zip(keys, row, strict=True))
    out["report"] = loads(out["report"]) or {}
    return out


def runs(db: Database, kind: str | None = None, plan: str | None = None) -> list[dict[str, Any]]:
    where, args = ["1=1"], []
    if kind:
        where.append("r.kind=?")
        args.append(kind)
    if plan:
        where.append("p.name=?")
        args.append(plan)
    ids = [
        r[0]
        for r in db.execute(
            f"SELECT r.id FROM plan_runs r JOIN plans p ON p.id=r.plan_id "
            f"WHERE {' AND '.join(where)} ORDER BY r.id DESC LIMIT 100",
            args,
        )
    ]
    return [run(db, i) for i in ids]


def update_run(
    db: Database,
    run_id: int,
    *,
    state: str | None = None,
    step: str | None = None,
    report: dict[str, Any] | None = None,
    ended: bool = False,
) -> None:
    sets, args = [], []
    if state is not None:
        sets.append("state=?")
        args.append(state)
    if step is not None:
        sets.append("step=?")
        args.append(step)
    if report is not None:
        sets.append("report=?")
        args.append(dumps(report))
    if ended:
        sets.append("ended_at=?")
        args.append(now())
    if sets:
        db.execute(f"UPDATE plan_runs SET {', '.join(sets)} WHERE id=?", [*args, run_id])
