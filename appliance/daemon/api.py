"""The local API: HTTP + JSON on a unix socket, OpenAPI schema at /openapi.json.

Handlers are plain ``def`` so FastAPI runs them in its thread pool: they may block on SQLite.
Errors leave as ``{"code", "message", "hint"}`` with the status of the FerrymanError.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from appliance import __version__
from appliance.daemon.state import DaemonState
from appliance.errors import FerrymanError, NotFound


class JobRequest(BaseModel):
    kind: str = Field(description="job kind, e.g. 'probe', 'sync'")
    machine: str | None = Field(default=None, description="machine name or id")
    params: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(BaseModel):
    code: str
    message: str
    hint: str | None = None


def _who(request: Request) -> tuple[str, str]:
    return (
        request.headers.get("x-ferryman-user", "unknown"),
        request.headers.get("x-ferryman-origin", "api"),
    )


def create_app(state: DaemonState) -> FastAPI:
    app = FastAPI(
        title="ferrymand",
        version=__version__,
        description="Ferryman engine API (local unix socket). Every CLI verb and TUI action "
        "goes through it.",
        responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody}, 409: {"model": ErrorBody}},
    )

    @app.exception_handler(FerrymanError)
    def _ferryman_error(_: Request, exc: FerrymanError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content=exc.to_dict())

    @app.get("/v1/health")
    def health() -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": state.pid,
            "started_at": state.started_at,
            "store": str(state.db_path),
            "schema": state.schema,
            "probe": state.probe_verdict(),
            "jobs_active": len(state.runner.list_jobs(active_only=True)),
        }

    @app.get("/v1/jobs")
    def list_jobs(active: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        return state.runner.list_jobs(active_only=active, limit=limit)

    @app.get("/v1/jobs/{job_id}")
    def get_job(job_id: int) -> dict[str, Any]:
        return state.runner.get(job_id)

    @app.post("/v1/jobs", status_code=202)
    def submit_job(req: JobRequest, request: Request) -> dict[str, Any]:
        who, origin = _who(request)
        machine_id = state.machine_id(req.machine) if req.machine is not None else None
        try:
            job = state.runner.submit(
                req.kind, machine_id=machine_id, params=req.params, who=who, origin=origin
            )
        except FerrymanError as e:
            state.audit(
                who, origin, f"job.{req.kind}", {"machine": req.machine}, f"refused: {e.message}"
            )
            raise
        state.audit(who, origin, f"job.{req.kind}", {"machine": req.machine}, f"job {job['id']}")
        return job

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202)
    def cancel_job(job_id: int, request: Request) -> dict[str, Any]:
        who, origin = _who(request)
        job = state.runner.cancel(job_id)
        state.audit(who, origin, "job.cancel", {"job": job_id}, "requested")
        return job

    @app.get("/v1/events")
    def list_events(
        since: int = 0, machine: str | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        machine_id = state.machine_id(machine) if machine else None
        return state.events(since_id=since, machine_id=machine_id, limit=limit)

    @app.get("/v1/probe")
    def probe_verdict() -> dict[str, Any]:
        verdict = state.probe_verdict()
        if verdict is None:
            raise NotFound(
                "no KVM probe verdict yet", hint="run one: ferryman probe (takes up to a minute)"
            )
        return verdict

    return app
