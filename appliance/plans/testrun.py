"""The test-run job: bring the plan up on isolated networks, measure, always clean up.

Replication keeps running: a test run holds no machine lock, it registers itself as a reader
of the restore points it boots (retention never merges under it) and works on overlays.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlite_utils import Database

from appliance import evidence
from appliance.daemon.jobs import JobContext
from appliance.errors import Cancelled, Conflict, FerrymanError
from appliance.plans import records
from appliance.plans import report as report_mod
from appliance.plans.model import Inventory, check_document
from appliance.plans.runner import PlanRun, cleanup, export_dir

log = logging.getLogger(__name__)


def start(db: Database, plan: str, version: int | None = None) -> int:
    """Validate the plan against today's inventory and create the run row (state queued)."""
    p = records.get(db, plan, version)
    check_document(p["document"], Inventory.from_db(db))
    busy = db.execute(
        "SELECT r.id FROM plan_runs r JOIN plans p ON p.id=r.plan_id WHERE p.name=? AND "
        "r.kind='test' AND r.state IN ('queued','running','cleaning')",
        [plan],
    ).fetchone()
    if busy:
        raise Conflict(
            f"plan '{plan}' already has test run {busy[0]} in progress",
            hint=f"wait for it or cancel it: ferryman testrun cancel {busy[0]}",
        )
    return records.create_run(db, p["id"], "test", "queued", "queued")


def export(db: Database, run_id: int) -> str:
    """Write report.json and report.txt beside the run's console logs; returns the folder."""
    out = export_dir(run_id)
    out.mkdir(parents=True, exist_ok=True)
    run = records.run(db, run_id)
    (out / "report.json").write_text(json.dumps(run, indent=2, default=str) + "\n")
    (out / "report.txt").write_text(report_mod.text(run) + "\n")
    return str(out)


def _evidence_disks(db: Database, rep: dict[str, Any], run_id: int) -> dict[str, Any] | None:
    """Block hashes of the run's disks for its evidence pack, taken before clean-up drops the
    run's readers (retention may merge a point nobody reads)."""
    try:
        return evidence.collect_disks(db, rep, f"evidence pack of test run {run_id}")
    except Exception:
        log.exception("hashing the disks of run %s for its evidence pack", run_id)
        return None  # the pack is still written: it hashes what is left, or says why not


def run_testrun(ctx: JobContext) -> dict[str, Any]:
    db = ctx.db
    run_id = int(ctx.params["run"])
    run = records.run(db, run_id)
    plan_doc = records.by_id(db, run["plan_id"])["document"]
    records.update_run(db, run_id, state="running", step="resolve")
    state, error = "succeeded", None
    pr: PlanRun | None = None
    try:
        plan = check_document(plan_doc, Inventory.from_db(db))
        pr = PlanRun(
            db,
            run_id,
            plan,
            kind="test",
            cancel=ctx.cancel,
            event=lambda msg, level="info": ctx.event(msg, level=level, run=run_id),
            phase=ctx.progress.set_phase,
            use_preconverted=bool(ctx.params.get("preconverted", True)),
        )
        pr.report["job"] = ctx.job_id
        ctx.progress.set_phase("resolving restore points")
        pr.resolve()
        records.update_run(db, run_id, step="prepare")
        pr.prepare()
        records.update_run(db, run_id, step="bring-up")
        pr.bring_up()
    except Cancelled as e:
        state, error = "cancelled", str(e)
        raise
    except FerrymanError as e:
        state, error = "failed", str(e)
        raise
    except Exception as e:
        state, error = "failed", f"internal error: {e!r}"
        raise
    finally:
        ctx.progress.set_phase("cleaning up")
        rep = pr.report if pr is not None else records.run(db, run_id)["report"]
        disks = _evidence_disks(db, rep, run_id)  # while the run still holds its points
        records.update_run(db, run_id, state="cleaning", step="clean-up", report=rep)
        c = cleanup(db, run_id, rep)
        rep["cleanup"] = c
        rep["error"] = error
        rep["export_dir"] = str(export_dir(run_id))
        if not c["ok"]:
            ctx.event(
                f"test run {run_id}: clean-up incomplete: {'; '.join(c['problems'])}",
                level="error",
            )
        records.update_run(db, run_id, state=state, step="done", report=rep, ended=True)
        ctx.progress.set_phase("writing the evidence pack")
        evidence.write_logged(db, run_id, disks, event=ctx.event, job_id=ctx.job_id)
        try:
            export(db, run_id)
        except OSError as e:
            log.warning("exporting the report of run %s failed: %s", run_id, e)
    totals = rep.get("totals") or {}
    ctx.event(
        f"test run {run_id} of plan {run['plan']}: all {totals.get('machines')} machines ready, "
        f"RTO {totals.get('rto_s')} s"
    )
    return {"run": run_id, "state": state, "totals": totals, "cleanup_ok": rep["cleanup"]["ok"]}


def recover_interrupted(db: Database) -> list[dict[str, Any]]:
    """At daemon start: runs a crashed daemon left open. Test runs are cleaned up and marked
    interrupted; a cutover step in progress is marked interrupted and keeps its target (the
    operator repeats the step or rolls back)."""
    out: list[dict[str, Any]] = []
    rows = db.execute(
        "SELECT id, kind, state, step FROM plan_runs WHERE "
        "(kind='test' AND state IN ('queued','running','cleaning')) OR "
        "(kind='cutover' AND state IN ('running','rolling-back')) ORDER BY id"
    ).fetchall()
    for run_id, kind, state, step in rows:
        run = records.run(db, run_id)
        rep = run["report"] or {}
        if kind == "test":
            disks = _evidence_disks(db, rep, run_id)
            c = cleanup(db, run_id, rep)
            rep["cleanup"] = c
            rep["error"] = (
                f"ferrymand stopped while the test run was {state} ({step}); "
                "the run was cleaned up at the next start"
            )
            rep["export_dir"] = str(export_dir(run_id))
            records.update_run(db, run_id, state="interrupted", report=rep, ended=True)
            evidence.write_logged(db, run_id, disks)
            try:
                export(db, run_id)
            except OSError as e:
                log.warning("exporting the report of run %s failed: %s", run_id, e)
            out.append({"run": run_id, "kind": kind, "action": "cleaned", "cleanup": c})
        else:
            rep.setdefault("steps", []).append(
                {"step": step, "state": "interrupted", "detail": "ferrymand stopped mid-step"}
            )
            records.update_run(db, run_id, state="interrupted", report=rep)
            evidence.write_logged(db, run_id)
            out.append({"run": run_id, "kind": kind, "action": "interrupted", "step": step})
        from store.records import add_event

        add_event(
            db,
            f"plan run {run_id} ({kind}) interrupted by a daemon restart at step {step}"
            + ("; cleaned up" if kind == "test" else "; repeat the step or roll back"),
            level="warning",
            kind="plan",
        )
    return out
