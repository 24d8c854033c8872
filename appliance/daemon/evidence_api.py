"""API endpoints of evidence packs (an APIRouter the daemon includes).

Packs live in the root-only state directory; operators and auditors on other accounts read
them through the daemon. The bytes are served as written: the signature covers them.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response

from appliance import evidence
from appliance.errors import NotFound


def build_router() -> APIRouter:
    r = APIRouter(tags=["evidence"])

    @r.get("/v1/evidence")
    def list_packs() -> list[dict[str, Any]]:
        return evidence.list_packs()

    @r.get("/v1/evidence/key")
    def key() -> dict[str, Any]:
        """This appliance's public signing key (created with the first pack)."""
        k = evidence.appliance_key()
        if k is None:
            raise NotFound(
                "this appliance has no evidence signing key yet",
                hint="it is created when the first test run or cutover ends",
            )
        return k

    @r.get("/v1/evidence/{run_id}", response_class=Response)
    def pack(run_id: int) -> Response:
        return Response(evidence.read_pack(run_id), media_type="application/json")

    return r
