"""API endpoints of plans, test runs and cutovers (an APIRouter the daemon includes).

    router = build_router(state)      # state: appliance.daemon.state.DaemonState
    app.include_router(router)

Invalid plans answer 422 with every problem (JSON path, message, fix) in ``problems``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from appliance.daemon import auth
from appliance.daemon.state import DaemonState
from appliance.errors import FerrymanError
from appliance.plans import approval, cutover, records, report, testrun
from appliance.plans.generate import new_plan
from appliance.plans.model import Inventory, validate
from appliance.plans.schema import SCHEMA


class PlanDocument(BaseModel):
    document: dict[str, Any] = Field(description="the plan (see /v1/plans/schema)")


class NewPlanRequest(BaseModel):
    name: str = Field(min_length=1, max_length=63)
    machines: list[str] | None = Field(default=None, description="default: every protected one")


class RunRequest(BaseModel):
    version: int | None = Field(default=None, description="default: the newest version")


class TestRunRequest(RunRequest):
    preconverted: bool = Field(
        default=True,
        description="boot a machine's pre-converted point (no conversion) when the run uses "
        "that point; false: always convert",
    )


class CutoverRequest(RunRequest):
    mode: str = Field(
        default="guided",
        pattern="^(guided|step)$",
        description="guided: last delta, seal and bring-up follow the stop without a pause; "
        "step: every step waits for its confirmation",
    )
    shutdown_timeout_s: float = Field(default=300.0, ge=5, le=3600)
    use_preconverted: bool = Field(
        default=False,
        description="skip the last delta: boot each machine's pre-converted point (RTO = boot "
        "time); the operator accepts losing what the sources wrote since those points",
    )


class ApproveRequest(BaseModel):
    confirm: str = Field(description="the plan's name, typed by the approving operator")


class PolicyRequest(BaseModel):
    two_operators: bool = Field(description="a cutover waits for a second operator's approval")


class StepRequest(BaseModel):
    step: str = Field(description="the step being confirmed, as named by the run's 'next'")


def _who(request: Request) -> tuple[str, str]:
    """Plans, test runs and cutover steps change things: they need the operator role."""
    c = auth.authorize(request, "operator", f"use {request.url.path}")
    return c.user, c.origin


def run_audited(
    state: DaemonState, request: Request, action: str, params: dict[str, Any], fn: Any
) -> Any:
    """fn(who, origin) for an operator, its outcome in the audit trail (refusals too)."""
    who, origin = _who(request)
    try:
        out = fn(who, origin)
    except FerrymanError as e:
        state.audit(who, origin, action, params, f"refused: {e.message}")
        raise
    state.audit(who, origin, action, params, "ok")
    return out


def build_router(state: DaemonState) -> APIRouter:
    r = APIRouter(tags=["plans"])

    def audited(request: Request, action: str, params: dict[str, Any], fn: Any) -> Any:
        return run_audited(state, request, action, params, fn)

    # -- plans ---------------------------------------------------------------------------

    @r.get("/v1/plans")
    def list_plans() -> list[dict[str, Any]]:
        return records.list_plans(state.db)

    @r.get("/v1/plans/schema")
    def schema() -> dict[str, Any]:
        return SCHEMA

    @r.post("/v1/plans/validate")
    def validate_plan(req: PlanDocument) -> dict[str, Any]:
        problems = validate(req.document, Inventory.from_db(state.db))
        return {"ok": not problems, "problems": [p.to_dict() for p in problems]}

    @r.post("/v1/plans/new")
    def generate(req: NewPlanRequest) -> dict[str, Any]:
        return new_plan(state.db, req.name, req.machines)

    @r.put("/v1/plans/{name}")
    def save(name: str, req: PlanDocument, request: Request) -> dict[str, Any]:
        return dict(
            audited(
                request,
                "plan.save",
                {"plan": name},
                lambda who, _o: records.save(state.db, name, req.document, who),
            )
        )

    @r.get("/v1/plans/{name}")
    def show(name: str, version: int | None = None) -> dict[str, Any]:
        return records.get(state.db, name, version)

    @r.get("/v1/plans/{name}/diff")
    def diff(name: str, a: int | None = None, b: int | None = None) -> dict[str, Any]:
        return records.diff(state.db, name, a, b)

    # -- test runs -----------------------------------------------------------------------

    @r.post("/v1/plans/{name}/testruns", status_code=202)
    def start_testrun(name: str, req: TestRunRequest, request: Request) -> dict[str, Any]:
        def go(who: str, origin: str) -> dict[str, Any]:
            run_id = testrun.start(state.db, name, req.version)
            try:
                job = state.runner.submit(
                    "testrun",
                    params={"run": run_id, "plan": name, "preconverted": req.preconverted},
                    who=who,
                    origin=origin,
                )
            except FerrymanError:
                records.update_run(state.db, run_id, state="failed", step="refused", ended=True)
                raise
            return {**records.run(state.db, run_id), "job": job}

        return dict(audited(request, "testrun.start", {"plan": name}, go))

    @r.get("/v1/testruns")
    def list_testruns(plan: str | None = None) -> list[dict[str, Any]]:
        return records.runs(state.db, "test", plan)

    @r.get("/v1/testruns/{run_id}")
    def show_testrun(run_id: int) -> dict[str, Any]:
        return records.run(state.db, run_id)

    @r.get("/v1/testruns/{run_id}/report", response_model=None)
    def testrun_report(run_id: int, format: str = "json") -> Any:
        run = records.run(state.db, run_id)
        if format == "text":
            return PlainTextResponse(report.text(run) + "\n")
        return run

    @r.post("/v1/testruns/{run_id}/cancel", status_code=202)
    def cancel_testrun(run_id: int, request: Request) -> dict[str, Any]:
        def go(_w: str, _o: str) -> dict[str, Any]:
            run = records.run(state.db, run_id)
            job = (run["report"] or {}).get("job")
            if job is None or run["state"] not in records.ACTIVE_TEST:
                from appliance.errors import Conflict

                raise Conflict(f"test run {run_id} is {run['state']}", hint="nothing to cancel")
            state.runner.cancel(int(job))
            return records.run(state.db, run_id)

        return dict(audited(request, "testrun.cancel", {"run": run_id}, go))

    # -- cutover -------------------------------------------------------------------------

    @r.post("/v1/plans/{name}/cutovers", status_code=201)
    def start_cutover(name: str, req: CutoverRequest, request: Request) -> dict[str, Any]:
        return dict(
            audited(
                request,
                "cutover.start",
                {"plan": name, "mode": req.mode, "use_preconverted": req.use_preconverted},
                lambda who, _o: cutover.start(
                    state.db,
                    name,
                    req.version,
                    who,
                    mode=req.mode,
                    shutdown_timeout_s=req.shutdown_timeout_s,
                    use_preconverted=req.use_preconverted,
                ),
            )
        )

    @r.get("/v1/cutovers")
    def list_cutovers(plan: str | None = None) -> list[dict[str, Any]]:
        return [cutover.status(state.db, x["id"]) for x in records.runs(state.db, "cutover", plan)]

    @r.get("/v1/cutovers/{run_id}")
    def cutover_status(run_id: int) -> dict[str, Any]:
        return cutover.status(state.db, run_id)

    @r.post("/v1/cutovers/{run_id}/confirm", status_code=202)
    def confirm(run_id: int, req: StepRequest, request: Request) -> dict[str, Any]:
        def go(who: str, origin: str) -> dict[str, Any]:
            return cutover.confirm(state.db, state.runner, run_id, req.step, who, origin)

        return dict(audited(request, "cutover.confirm", {"run": run_id, "step": req.step}, go))

    @r.post("/v1/cutovers/{run_id}/approve")
    def approve(run_id: int, req: ApproveRequest, request: Request) -> dict[str, Any]:
        def go(who: str, _o: str) -> dict[str, Any]:
            approval.approve(state.db, cutover.status(state.db, run_id), who, req.confirm)
            return cutover.status(state.db, run_id)

        return dict(audited(request, "cutover.approve", {"run": run_id}, go))

    @r.get("/v1/cutover-policy")
    def get_policy() -> dict[str, Any]:
        return approval.policy(state.db)

    @r.put("/v1/cutover-policy")
    def put_policy(req: PolicyRequest, request: Request) -> dict[str, Any]:
        c = auth.authorize(request, "admin", "change the cutover policy")
        out = approval.set_two_operators(state.db, req.two_operators)
        state.audit(c.user, c.origin, "cutover.policy", req.model_dump(), "ok")
        return out

    @r.post("/v1/cutovers/{run_id}/rollback", status_code=202)
    def rollback(run_id: int, request: Request) -> dict[str, Any]:
        def go(who: str, origin: str) -> dict[str, Any]:
            return cutover.request_rollback(state.db, state.runner, run_id, who, origin)

        return dict(audited(request, "cutover.rollback", {"run": run_id}, go))

    @r.get("/v1/cutovers/{run_id}/report", response_model=None)
    def cutover_report(run_id: int, format: str = "json") -> Any:
        run = cutover.status(state.db, run_id)
        if format == "text":
            return PlainTextResponse(report.text(run) + "\n")
        return run

    return r
