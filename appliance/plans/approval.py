"""Four-eyes cutover: "cutover needs two operators", an appliance setting an admin turns on.

With it on, a cutover opened by operator A waits (state "awaiting", next "final-delta") until
a DIFFERENT account with the operator or admin role approves it by typing the plan's name:

    ferryman cutover start PLAN              # A: preflight, the run waits for approval
    ferryman cutover approve RUN             # B: types PLAN; A approving is refused
    ferryman cutover confirm RUN final-delta # A or B: the steps as usual

No step but rollback runs before the approval. Requests, approvals and refusals are in the
audit trail (the API's ``audited`` wrapper). The approval lives in the run's report:
``{"required", "requested_by", "approved_by", "approved_at"}``.
"""

from __future__ import annotations

from typing import Any

from sqlite_utils import Database

from appliance.plans import records
from appliance.plans.errors import CutoverRefused
from store.db import now
from store.records import get_setting, set_setting

SETTING = "cutover_two_operators"


def two_operators(db: Database) -> bool:
    return bool(get_setting(db, SETTING, False))


def set_two_operators(db: Database, on: bool) -> dict[str, Any]:
    set_setting(db, SETTING, bool(on))
    return policy(db)


def policy(db: Database) -> dict[str, Any]:
    return {"two_operators": two_operators(db)}


def initial(db: Database, who: str) -> dict[str, Any]:
    """The approval record of a new cutover opened by ``who``."""
    return {
        "required": two_operators(db),
        "requested_by": who,
        "approved_by": None,
        "approved_at": None,
    }


def pending(run: dict[str, Any]) -> bool:
    a = (run.get("report") or {}).get("approval") or {}
    return bool(a.get("required")) and not a.get("approved_by")


def annotate(run: dict[str, Any]) -> dict[str, Any]:
    """Status fields: what the run waits for and the command that gives it."""
    a = (run.get("report") or {}).get("approval") or {}
    run["approval"] = a or None
    if pending(run) and run["state"] not in ("committed", "rolled-back"):
        run["waiting_for"] = (
            f"approval by a second operator (not {a.get('requested_by')}): "
            f"ferryman cutover approve {run['id']}"
        )
        run["confirm"] = None
    return run


def check_approved(run: dict[str, Any]) -> None:
    if pending(run):
        a = run["report"]["approval"]
        raise CutoverRefused(
            f"cutover {run['id']} of plan '{run['plan']}' waits for approval by a second "
            f"operator (requested by {a['requested_by']})",
            hint=f"another operator runs: ferryman cutover approve {run['id']}",
        )


def approve(db: Database, run: dict[str, Any], who: str, typed: str) -> None:
    """``run``: cutover.status() of the run; ``typed``: what the approver typed."""
    a = (run.get("report") or {}).get("approval") or {}
    rid = run["id"]
    if run["state"] in ("committed", "rolled-back"):
        raise CutoverRefused(f"cutover {rid} is {run['state']}", hint="nothing to approve")
    if run["state"] in ("running", "rolling-back"):
        raise CutoverRefused(
            f"cutover {rid} is busy with {run['step']}",
            hint=f"wait for it: ferryman cutover status {rid}",
        )
    if not a.get("required"):
        raise CutoverRefused(
            f"cutover {rid} needs no approval (it was opened without the two-operator rule)",
            hint=f"confirm its steps: ferryman cutover confirm {rid} {run.get('next')}",
        )
    if a.get("approved_by"):
        raise CutoverRefused(
            f"cutover {rid} is already approved by {a['approved_by']}",
            hint=f"confirm its steps: ferryman cutover confirm {rid} {run.get('next')}",
        )
    if who == a.get("requested_by"):
        raise CutoverRefused(
            f"{who} requested cutover {rid}: the approval must come from another operator",
            hint=f"another account with the operator role runs: ferryman cutover approve {rid}",
        )
    if typed != run["plan"]:
        raise CutoverRefused(
            f"the confirmation '{typed}' does not match plan '{run['plan']}'",
            hint="type the plan's name to approve its cutover",
        )
    rep = run["report"]
    rep["approval"] = {**a, "approved_by": who, "approved_at": now()}
    records.update_run(db, rid, report=rep)
