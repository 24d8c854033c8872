"""API endpoints of seeding over removable media (an APIRouter the daemon includes).

Export, import and verify are jobs: they run for hours on a USB disk and must outlive the
SSH session that started them. Requests carry the PATH of the key or passphrase file,
never the key: job parameters are stored, and the daemon reads the file when the job runs.
Both need the admin role: an export carries a whole machine out of the building.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from appliance import inventory, seeding
from appliance.daemon import auth
from appliance.daemon.state import DaemonState
from appliance.errors import FerrymanError, NotFound


class SeedKey(BaseModel):
    key_file: str | None = Field(default=None, description="path of a key file (seed keygen)")
    passphrase_file: str | None = Field(default=None, description="path of a passphrase file")


class SeedExportRequest(SeedKey):
    machine: str
    point: int | None = Field(default=None, description="restore point id; default the newest")
    to: str = Field(min_length=1, description="directory on the media (absolute path)")
    chunk_size: int = Field(default=seeding.CHUNK_SIZE)


class SeedDirRequest(SeedKey):
    dir: str = Field(min_length=1, description="the seed directory (absolute path)")


class SeedImportRequest(SeedDirRequest):
    machine: str | None = Field(default=None, description="default: the seed's machine name")


def _key_params(req: SeedKey) -> dict[str, Any]:
    if bool(req.key_file) == bool(req.passphrase_file):
        raise seeding.SeedError(
            "give exactly one of a key file and a passphrase file",
            hint="--key-file FILE (make one with: ferryman seed keygen FILE) or "
            "--passphrase-file FILE",
        )
    for p in (req.key_file, req.passphrase_file):
        if p and not os.path.isabs(p):
            raise seeding.SeedError(f"{p} is not an absolute path", hint="give the full path")
    return {"key_file": req.key_file, "passphrase_file": req.passphrase_file}


def _abs(path: str) -> str:
    if not os.path.isabs(path):
        raise seeding.SeedError(f"{path} is not an absolute path", hint="give the full path")
    return str(Path(path))


def build_router(state: DaemonState) -> APIRouter:
    r = APIRouter(tags=["seeds"])

    def submit(
        kind: str, machine_id: int | None, params: dict[str, Any], request: Request, what: str
    ) -> dict[str, Any]:
        c = auth.authorize(request, "admin", what)
        audit = {k: v for k, v in params.items() if k not in ("key_file", "passphrase_file")}
        try:
            job = state.runner.submit(
                kind, machine_id=machine_id, params=params, who=c.user, origin=c.origin
            )
        except FerrymanError as e:
            state.audit(c.user, c.origin, kind, audit, f"refused: {e.message}")
            raise
        state.audit(c.user, c.origin, kind, audit, f"job {job['id']}")
        return job

    @r.post("/v1/seeds/export", status_code=202)
    def seed_export(req: SeedExportRequest, request: Request) -> dict[str, Any]:
        m = inventory.machine_row(state.db, req.machine)
        rps = inventory.restore_points(state.db, m["id"])
        rp = rps[-1] if rps and req.point is None else None
        rp = rp or next((x for x in rps if x["id"] == req.point), None)
        if rp is None:
            raise NotFound(
                f"{m['name']} has no restore point {req.point or ''}".rstrip(),
                hint=f"sync it first (ferryman sync {m['name']} --full) or list them: "
                f"ferryman points {m['name']}",
            )
        params = {
            "machine": m["name"],
            "point": rp["id"],  # fixed now: a resumed job exports the same point
            "to": _abs(req.to),
            "chunk_size": seeding.check_chunk_size(req.chunk_size),
            **_key_params(req),
        }
        return submit("seed-export", None, params, request, "export seeds")

    @r.post("/v1/seeds/import", status_code=202)
    def seed_import(req: SeedImportRequest, request: Request) -> dict[str, Any]:
        root = _abs(req.dir)
        header = seeding.read_header(Path(root))
        name = req.machine or header["machine"]["name"]
        mid = state.machine_id(name)
        params = {"dir": root, **_key_params(req)}
        return submit("seed-import", mid, params, request, "import seeds")

    @r.post("/v1/seeds/verify", status_code=202)
    def seed_verify(req: SeedDirRequest, request: Request) -> dict[str, Any]:
        root = _abs(req.dir)
        seeding.read_header(Path(root))
        params = {"dir": root, **_key_params(req)}
        return submit("seed-verify", None, params, request, "verify seeds")

    @r.get("/v1/seeds")
    def seed_show(dir: str) -> dict[str, Any]:
        return seeding.describe(Path(_abs(dir)))

    return r
