"""API endpoints of boot verification and pre-converted points (an APIRouter the daemon
includes, like the plans' one).

    POST   /v1/machines/{name}/verify-boot      start a verification now (job "bootverify")
    PUT    /v1/machines/{name}/boot-verify      the automatic policy: off | every-sync | schedule
    GET    /v1/preconverted                     the kept pre-converted points
    DELETE /v1/machines/{name}/preconverted     drop a machine's pre-converted point
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from appliance import bootverify, inventory, preconverted
from appliance.daemon.state import DaemonState
from appliance.plans.api import run_audited


class VerifyBootRequest(BaseModel):
    restore_point: int | None = Field(default=None, description="default: the newest point")
    plan: str | None = Field(
        default=None, description="whose conversion and checks; default: the newest plan naming it"
    )


class BootVerifyPolicy(BaseModel):
    policy: str = Field(pattern="^(off|every-sync|schedule)$")
    every_s: int | None = Field(default=None, description="schedule: seconds between two")


def build_router(state: DaemonState) -> APIRouter:
    r = APIRouter(tags=["boot verification"])

    def audited(request: Request, action: str, params: dict[str, Any], fn: Any) -> Any:
        return run_audited(state, request, action, params, fn)

    @r.post("/v1/machines/{name}/verify-boot", status_code=202)
    def verify_boot(name: str, req: VerifyBootRequest, request: Request) -> dict[str, Any]:
        return dict(
            audited(
                request,
                "machine.verify_boot",
                {"machine": name, **req.model_dump()},
                lambda who, origin: bootverify.submit(
                    state.runner,
                    state.db,
                    name,
                    restore_point=req.restore_point,
                    plan=req.plan,
                    who=who,
                    origin=origin,
                ),
            )
        )

    @r.put("/v1/machines/{name}/boot-verify")
    def set_policy(name: str, req: BootVerifyPolicy, request: Request) -> dict[str, Any]:
        return dict(
            audited(
                request,
                "machine.boot_verify",
                {"machine": name, **req.model_dump()},
                lambda _w, _o: bootverify.set_policy(state.db, name, req.policy, req.every_s),
            )
        )

    @r.get("/v1/preconverted")
    def listing() -> list[dict[str, Any]]:
        return preconverted.listing(state.db)

    @r.delete("/v1/machines/{name}/preconverted")
    def drop(name: str, request: Request) -> dict[str, Any]:
        def go(_w: str, _o: str) -> dict[str, Any]:
            m = inventory.machine_row(state.db, name)
            deleted = preconverted.drop(state.db, m["id"])
            return {"machine": m["name"], "deleted": deleted}

        return dict(audited(request, "machine.preconverted.drop", {"machine": name}, go))

    return r
