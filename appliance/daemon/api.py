"""The local API: HTTP + JSON on a unix socket, OpenAPI schema at /openapi.json.

Handlers are plain ``def`` so FastAPI runs them in its thread pool: they may block on SQLite.
Errors leave as ``{"code", "message", "hint"}`` with the status of the FerrymanError.
"""

from __future__ import annotations

import shutil
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from appliance import __version__, inventory
from appliance.daemon import auth
from appliance.daemon.state import DaemonState
from appliance.errors import FerrymanError, NotFound


class JobRequest(BaseModel):
    kind: str = Field(description="job kind, e.g. 'probe', 'sync'")
    machine: str | None = Field(default=None, description="machine name or id")
    params: dict[str, Any] = Field(default_factory=dict)


class SourceRequest(BaseModel):
    name: str = Field(min_length=1, max_length=63)
    kind: str = Field(description="libvirt | nbd | vsphere | linux-agent")
    uri: str = Field(min_length=1, max_length=1024)
    username: str | None = Field(default=None, max_length=256)
    password: str | None = Field(
        default=None, max_length=4096, description="kept encrypted; never returned"
    )
    params: dict[str, Any] = Field(default_factory=dict)
    thumbprint: str | None = Field(default=None, description="SHA-256 the operator confirmed")
    insecure: bool = False
    test: bool = Field(default=True, description="reach the source before saving")


class SourceUpdate(BaseModel):
    """Only the fields given change; the daemon checks them all and names every bad one."""

    name: str | None = Field(default=None, description="new name")
    uri: str | None = None
    username: str | None = None
    password: str | None = Field(default=None, description="kept encrypted; never returned")
    params: dict[str, Any] | None = Field(
        default=None, description="merged into the old ones; null removes a key"
    )
    throttle_bps: int | None = Field(default=None, description="cap of every sync from it")
    clear_throttle: bool = False
    thumbprint: str | None = Field(default=None, description="SHA-256 the operator confirmed")
    insecure: bool | None = None
    test: bool = Field(default=True, description="reach the source with the new settings first")


class ProtectRequest(BaseModel):
    rpo_seconds: int | None = Field(default=None, ge=60)
    throttle_bps: int | None = Field(default=None, ge=65536)
    verify_every_sync: bool | None = None


class MachineSettings(ProtectRequest):
    clear_throttle: bool = False


class SyncRequest(BaseModel):
    full: bool = False


class ConvertRequest(BaseModel):
    overlay: str | None = Field(
        default=None, min_length=1, description="new qcow2 file for the converted guest"
    )
    backend: str | None = Field(default=None, pattern="^(builtin|virt-v2v)$")
    preview: bool = Field(
        default=False, description="convert onto a throw-away overlay, deleted at the end"
    )


class AuditExportRequest(BaseModel):
    since: str | None = Field(default=None, description="ISO time: entries at or after it")


class ErrorBody(BaseModel):
    code: str
    message: str
    hint: str | None = None


def _who(request: Request, role: str = "operator", action: str = "do this") -> tuple[str, str]:
    """The caller (from the kernel's peer credentials) if their role allows the action."""
    c = auth.authorize(request, role, action)
    return c.user, c.origin


def _iso_time(text: str) -> str:
    """An ISO date or time as the audit trail stores it (UTC, +00:00)."""
    from datetime import UTC, datetime

    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise FerrymanError(
            f"'{text}' is not a date or time",
            hint="give an ISO time: 2026-11-26 or 2026-11-26T09:30",
        ) from None
    t = t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)
    return t.isoformat(timespec="microseconds")


def create_app(state: DaemonState) -> FastAPI:
    app = FastAPI(
        title="ferrymand",
        version=__version__,
        description="Ferryman engine API (local unix socket). Every CLI verb and TUI action "
        "goes through it.",
        responses={
            400: {"model": ErrorBody},
            403: {"model": ErrorBody},
            404: {"model": ErrorBody},
            409: {"model": ErrorBody},
        },
    )

    app.state.ferryman = state

    @app.exception_handler(FerrymanError)
    def _ferryman_error(_: Request, exc: FerrymanError) -> JSONResponse:
        return JSONResponse(status_code=exc.http_status, content=exc.to_dict())

    @app.exception_handler(RequestValidationError)
    def _bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A body of the wrong shape: one line per bad field, as our own checks give."""
        lines = [
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        ]
        return JSONResponse(
            status_code=422,
            content={
                "code": "invalid",
                "message": f"{request.method} {request.url.path}: "
                + ("\n  ".join(["request not accepted", *lines])),
                "hint": "see the API schema: ferryman api-schema, or /openapi.json",
                "problems": lines,
            },
        )

    @app.post("/v1/login")
    def login(request: Request) -> dict[str, Any]:
        """A TUI or SSH session starts: recorded in the audit trail with its origin."""
        c = auth.caller(request)
        state.audit(c.user, c.origin, "login", {"pid": c.pid}, "ok")
        return {"user": c.user, "role": c.role, "origin": c.origin}

    @app.get("/v1/whoami")
    def whoami(request: Request) -> dict[str, Any]:
        c = auth.caller(request)
        return {"user": c.user, "role": c.role, "origin": c.origin}

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
        who, origin = _who(request, "operator", f"start a {req.kind} job")
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
        who, origin = _who(request, "operator", "cancel jobs")
        job = state.runner.cancel(job_id)
        state.audit(who, origin, "job.cancel", {"job": job_id}, "requested")
        return job

    @app.get("/v1/events")
    def list_events(
        since: int = 0, machine: str | None = None, limit: int = 200
    ) -> list[dict[str, Any]]:
        machine_id = state.machine_id(machine) if machine else None
        return state.events(since_id=since, machine_id=machine_id, limit=limit)

    # -- sources ------------------------------------------------------------------------

    @app.get("/v1/sources")
    def sources() -> list[dict[str, Any]]:
        return inventory.list_sources(state.db)

    @app.post("/v1/sources", status_code=201)
    def add_source(req: SourceRequest, request: Request) -> dict[str, Any]:
        who, origin = _who(request, "admin", "add sources")
        params = {"name": req.name, "kind": req.kind, "uri": req.uri, "insecure": req.insecure}
        try:
            src = state.add_source(req)
        except FerrymanError as e:
            state.audit(who, origin, "source.add", params, f"refused: {e.message}")
            raise
        state.audit(who, origin, "source.add", params, "ok")
        return src

    @app.patch("/v1/sources/{name}")
    def edit_source(name: str, req: SourceUpdate, request: Request) -> dict[str, Any]:
        from appliance.daemon import source_edit

        who, origin = _who(request, "admin", "edit sources")
        fields = req.model_dump(exclude_none=True, exclude={"password"})
        params = {"name": name, **fields, **({"password": "***"} if req.password else {})}
        try:
            src, changed, moved = source_edit.apply(
                state.db, state.vault, name, source_edit.Edit(**req.model_dump())
            )
        except FerrymanError as e:
            state.audit(who, origin, "source.edit", params, f"refused: {e.message}")
            raise
        state.audit(who, origin, "source.edit", params, f"changed: {', '.join(changed) or '-'}")
        if changed:
            state.source_edited(src, changed, moved, who)
        return {**src, "changed": changed, "endpoint_changed": moved}

    @app.post("/v1/sources/{name}/test")
    def test_source(name: str, request: Request) -> dict[str, Any]:
        _who(request, "operator", "test sources")
        state.adapter(name).test()
        return {"ok": True, "source": name}

    @app.delete("/v1/sources/{name}")
    def remove_source(name: str, request: Request, purge: bool = False) -> dict[str, Any]:
        who, origin = _who(request, "admin", "remove sources")
        src = inventory.source_row(state.db, name)
        ids = [
            r[0] for r in state.db.execute("SELECT id FROM machines WHERE source_id=?", [src["id"]])
        ]
        inventory.delete_source(state.db, name)
        purged = []
        if purge:
            from appliance.replication import machine_dir

            for mid in ids:
                d = machine_dir(mid)
                if d.exists():
                    shutil.rmtree(d)
                    purged.append(str(d))
        state.audit(who, origin, "source.remove", {"name": name, "purge": purge}, "ok")
        return {"removed": src["name"], "purged": purged}

    @app.post("/v1/sources/{name}/discover", status_code=202)
    def discover(name: str, request: Request) -> dict[str, Any]:
        who, origin = _who(request, "operator", "discover machines")
        src = inventory.source_row(state.db, name)
        return state.runner.submit(
            "discover", params={"source": src["name"]}, who=who, origin=origin
        )

    @app.get("/v1/ssh-probe")
    def ssh_probe(uri: str, request: Request) -> dict[str, Any]:
        _who(request, "operator", "probe SSH host keys")
        from appliance.sources.registry import ssh_host_key

        return ssh_host_key(uri)

    @app.get("/v1/tls-probe")
    def tls_probe(uri: str) -> dict[str, Any]:
        return state.tls_probe(uri)

    # -- machines -----------------------------------------------------------------------

    @app.get("/v1/machines")
    def machines() -> list[dict[str, Any]]:
        return inventory.machines_overview(state.db)

    @app.get("/v1/machines/{name}")
    def machine(name: str) -> dict[str, Any]:
        return inventory.machine_detail(state.db, name)

    @app.post("/v1/machines/{name}/protect")
    def protect(name: str, req: ProtectRequest, request: Request) -> dict[str, Any]:
        who, origin = _who(request, "operator", "protect machines")
        m = state.protect(name, req)
        state.audit(who, origin, "machine.protect", {"machine": name, **req.model_dump()}, "ok")
        return m

    @app.post("/v1/machines/{name}/unprotect")
    def unprotect(name: str, request: Request) -> dict[str, Any]:
        who, origin = _who(request, "operator", "unprotect machines")
        m = inventory.set_protection(state.db, name, protected=False)
        state.audit(who, origin, "machine.unprotect", {"machine": name}, "ok")
        return m

    @app.patch("/v1/machines/{name}")
    def set_machine(name: str, req: MachineSettings, request: Request) -> dict[str, Any]:
        who, origin = _who(request, "operator", "change machine settings")
        m = inventory.set_protection(
            state.db,
            name,
            rpo_seconds=req.rpo_seconds,
            throttle_bps=req.throttle_bps,
            verify_every_sync=req.verify_every_sync,
            clear_throttle=req.clear_throttle,
        )
        # A running sync follows the new throttle at once.
        state.runner.set_live(m["id"], throttle_bps=m["throttle_bps"])
        state.audit(who, origin, "machine.set", {"machine": name, **req.model_dump()}, "ok")
        return m

    @app.post("/v1/machines/{name}/sync", status_code=202)
    def sync(name: str, req: SyncRequest, request: Request) -> dict[str, Any]:
        who, origin = _who(request, "operator", "start syncs")
        m = inventory.machine_row(state.db, name)
        return state.runner.submit(
            "sync", machine_id=m["id"], params={"full": req.full}, who=who, origin=origin
        )

    @app.get("/v1/machines/{name}/restore-points")
    def restore_points(name: str) -> list[dict[str, Any]]:
        m = inventory.machine_row(state.db, name)
        return inventory.restore_points(state.db, m["id"])

    @app.delete("/v1/restore-points/{rp_id}")
    def delete_restore_point(rp_id: int, request: Request) -> dict[str, Any]:
        who, origin = _who(request, "admin", "delete restore points")
        out = state.delete_restore_point(rp_id)
        state.audit(who, origin, "restore_point.delete", {"id": rp_id}, "ok")
        return out

    @app.post("/v1/restore-points/{rp_id}/verify", status_code=202)
    def verify(rp_id: int, request: Request) -> dict[str, Any]:
        who, origin = _who(request, "operator", "verify restore points")
        row = state.db.execute(
            "SELECT machine_id FROM restore_points WHERE id=?", [rp_id]
        ).fetchone()
        if row is None:
            raise NotFound(
                f"no restore point {rp_id}", hint="list them with: ferryman points MACHINE"
            )
        return state.runner.submit(
            "verify", machine_id=row[0], params={"restore_point": rp_id}, who=who, origin=origin
        )

    def _point_job(
        rp_id: int, kind: str, params: dict[str, Any], request: Request
    ) -> dict[str, Any]:
        who, origin = _who(request, "operator", f"{kind} restore points")
        row = state.db.execute(
            "SELECT machine_id FROM restore_points WHERE id=? AND state='sealed'", [rp_id]
        ).fetchone()
        if row is None:
            raise NotFound(
                f"no restore point {rp_id}", hint="list them with: ferryman points MACHINE"
            )
        return state.runner.submit(
            kind,
            machine_id=row[0],
            params={"restore_point": rp_id, **params},
            who=who,
            origin=origin,
        )

    @app.post("/v1/restore-points/{rp_id}/inspect", status_code=202)
    def inspect_point(rp_id: int, request: Request) -> dict[str, Any]:
        return _point_job(rp_id, "inspect", {}, request)

    @app.post("/v1/restore-points/{rp_id}/convert", status_code=202)
    def convert_point(rp_id: int, req: ConvertRequest, request: Request) -> dict[str, Any]:
        if not req.preview and not req.overlay:
            raise FerrymanError(
                f"converting restore point {rp_id} needs the new overlay's file name",
                hint="give overlay (ferryman convert ID --to FILE), or preview: true",
            )
        return _point_job(rp_id, "convert", req.model_dump(exclude_none=True), request)

    @app.get("/v1/audit")
    def audit_log(limit: int = 200) -> list[dict[str, Any]]:
        cols = ["id", "ts", "who", "origin", "action", "params", "result"]
        rows = state.db.execute(
            f"SELECT {', '.join(cols)} FROM audit ORDER BY id DESC LIMIT ?", [limit]
        ).fetchall()
        return [dict(zip(cols, r, strict=True)) for r in reversed(rows)]

    @app.post("/v1/audit/export")
    def audit_export(req: AuditExportRequest, request: Request) -> dict[str, Any]:
        """Every entry with its hashes, for the customer's records; the export is audited."""
        from store.records import audit_entries

        c = auth.caller(request)
        since = _iso_time(req.since) if req.since else None
        rows = audit_entries(state.db, since)
        state.audit(c.user, c.origin, "audit.export", {"since": since}, f"{len(rows)} entries")
        return {"since": since, "entries": rows}

    @app.get("/v1/probe")
    def probe_verdict() -> dict[str, Any]:
        verdict = state.probe_verdict()
        if verdict is None:
            raise NotFound(
                "no KVM probe verdict yet", hint="run one: ferryman probe (takes up to a minute)"
            )
        return verdict

    from appliance.daemon.evidence_api import build_router as evidence_router
    from appliance.plans.api import build_router

    app.include_router(build_router(state))
    app.include_router(evidence_router())
    from appliance.bootverify_api import build_router as bootverify_router

    app.include_router(bootverify_router(state))
    from appliance.daemon import api_seeds

    app.include_router(api_seeds.build_router(state))
    return app
