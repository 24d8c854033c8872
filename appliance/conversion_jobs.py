"""Conversion as daemon jobs: inspect a restore point (stored with it), preflight, and
convert it onto a named throw-away overlay. The chain itself is only ever read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance import inventory
from appliance.config import paths
from appliance.daemon.jobs import JobContext
from appliance.datapath.chain import DiskChain
from appliance.errors import FerrymanError, NotFound
from appliance.replication import point_name
from store.db import dumps

OVERLAY_HOLDER = "converted overlay "  # reader holder prefix; the reader ends with the file


def drop_stale_overlay_readers(chain: DiskChain) -> None:
    """Converted overlays are files the operator deletes when done: forget their readers."""
    for p in chain.points():
        for r in chain.readers(p.name):
            holder = str(r.get("holder", ""))
            if (
                holder.startswith(OVERLAY_HOLDER)
                and not Path(holder[len(OVERLAY_HOLDER) :]).exists()
            ):
                chain.remove_reader(p.name, str(r["id"]))


def _point(ctx: JobContext) -> tuple[dict[str, Any], Path, DiskChain, str]:
    rp_id = int(ctx.params["restore_point"])
    rp = next(
        (r for r in inventory.restore_points(ctx.db, int(ctx.machine_id or 0)) if r["id"] == rp_id),
        None,
    )
    if rp is None or not rp["disks"]:
        raise NotFound(f"no restore point {rp_id}", hint="list them with: ferryman points NAME")
    if rp["verified"] == "mismatch":
        raise FerrymanError(
            f"restore point {rp_id} failed verification",
            hint="do not convert or boot it; sync again and use a newer point",
        )
    boot = Path(rp["disks"][0]["path"])  # the first disk is the boot disk
    return rp, boot, DiskChain(boot.parent), point_name(int(rp["session_id"]))


def run_inspect(ctx: JobContext) -> dict[str, Any]:
    from appliance.convert.inspect import inspect_image
    from appliance.convert.preflight import preflight

    rp, boot, chain, point = _point(ctx)
    ctx.progress.set_phase(f"inspecting restore point {rp['id']} (libguestfs)")
    with chain.reading(point, f"inspect job {ctx.job_id}"):
        insp = inspect_image(boot)
    verdict = preflight(insp, backend=ctx.params.get("backend"))
    out = {"inspection": insp.to_dict(), "preflight": verdict.to_dict()}
    ctx.db.execute("UPDATE restore_points SET inspection=? WHERE id=?", [dumps(out), rp["id"]])
    ctx.event(
        f"restore point {rp['id']}: {insp.distro or insp.os_type} "
        f"{'ready to convert' if verdict.ok else 'BLOCKED: ' + str(verdict.blockers[0])}"
    )
    return {"restore_point": rp["id"], **out}


def preview_path(rp_id: int, job_id: int) -> Path:
    """Where a preview converts: beside the chains (same filesystem), deleted at the end."""
    return paths().volume_dir / "previews" / f"rp{rp_id}-job{job_id}.qcow2"


def run_convert(ctx: JobContext) -> dict[str, Any]:
    """Convert onto a named overlay, or with ``preview``: onto a throw-away one that is
    deleted (and its reader dropped) as soon as the result is known."""
    from appliance.convert.api import convert

    rp, boot, chain, point = _point(ctx)
    preview = bool(ctx.params.get("preview"))
    if preview:
        overlay = preview_path(int(rp["id"]), ctx.job_id)
        overlay.unlink(missing_ok=True)  # a crash's leftover of this very job
    else:
        overlay = Path(ctx.params["overlay"])
    if overlay.exists():
        raise FerrymanError(f"{overlay} already exists", hint="choose a new file name")

    def progress(step: str, fraction: float) -> None:
        ctx.progress.set_phase(f"converting: {step}", fraction=round(fraction, 2))

    rid = chain.add_reader(point, f"{OVERLAY_HOLDER}{overlay}")  # retention keeps the base
    try:
        res = convert(
            boot,
            overlay,
            backend=ctx.params.get("backend"),
            progress=progress,
            cancel=ctx.cancel,
            plan=ctx.params.get("customise"),
        )
    except BaseException:
        chain.remove_reader(point, rid)
        raise
    if preview:
        overlay.unlink(missing_ok=True)
        chain.remove_reader(point, rid)
        ctx.event(
            f"restore point {rp['id']} converts ({res.backend}) in {res.seconds:.0f} s "
            "(preview; the overlay is deleted)"
        )
        return {"restore_point": rp["id"], "preview": True, **res.to_dict()}
    ctx.event(
        f"restore point {rp['id']} converted ({res.backend}) to {overlay} in "
        f"{res.seconds:.0f} s; remove the file when done, then: ferryman point release "
        f"{rp['id']}"
    )
    return {"restore_point": rp["id"], "reader": rid, **res.to_dict()}
