"""The job kinds ferrymand knows. Each subsystem adds its kinds here."""

from __future__ import annotations

from typing import Any

from appliance import probe
from appliance.daemon.jobs import JobContext, JobSpec
from store.records import set_setting


def run_probe(ctx: JobContext) -> dict[str, Any]:
    """Boot the host kernel under KVM, then TCG; store the verdict the daemon acts on."""
    ctx.progress.set_phase("probing KVM (boots the host kernel, up to a minute)")
    result = probe.probe()
    ctx.check_cancel()
    verdict = result.to_dict()
    set_setting(ctx.db, "probe", verdict)
    probe.apply_to_environment(result)
    level = "info" if result.accel != "none" else "error"
    ctx.event(f"KVM probe: using {result.accel} ({result.kvm_detail})", level=level)
    return verdict


def run_discover(ctx: JobContext) -> dict[str, Any]:
    """Ask the source for its machines and record them (refresh on demand)."""
    from appliance import inventory
    from appliance.daemon.state import adapter_for

    name = ctx.params["source"]
    src = inventory.source_row(ctx.db, name)
    ctx.progress.set_phase(f"discovering machines on {src['name']}")
    found = adapter_for(ctx.db, src).discover()
    ctx.check_cancel()
    counts = inventory.record_discovery(ctx.db, src["id"], found)
    ctx.event(
        f"discovery on {src['name']}: {len(found)} machines ({counts['added']} new, "
        f"{counts['missing']} missing)",
        kind="source",
    )
    return {"source": src["name"], "machines": len(found), **counts}


def _sync(ctx: JobContext) -> dict[str, Any]:
    from appliance import replication

    return replication.run_sync(ctx)


def _verify(ctx: JobContext) -> dict[str, Any]:
    from appliance import replication

    return replication.run_verify(ctx)


def _inspect(ctx: JobContext) -> dict[str, Any]:
    from appliance import conversion_jobs

    return conversion_jobs.run_inspect(ctx)


def _convert(ctx: JobContext) -> dict[str, Any]:
    from appliance import conversion_jobs

    return conversion_jobs.run_convert(ctx)


def _seed_export(ctx: JobContext) -> dict[str, Any]:
    from appliance import seeding

    return seeding.run_export(ctx)


def _seed_import(ctx: JobContext) -> dict[str, Any]:
    from appliance import seeding

    return seeding.run_import(ctx)


def _seed_verify(ctx: JobContext) -> dict[str, Any]:
    from appliance import seeding

    return seeding.run_verify(ctx)


def _bootverify(ctx: JobContext) -> dict[str, Any]:
    from appliance import bootverify

    return bootverify.run_boot_verify(ctx)


def all_specs() -> list[JobSpec]:
    from appliance.plans import jobs as plan_jobs

    return [
        *plan_jobs.specs(),
        JobSpec(
            "inspect",
            _inspect,
            needs_machine=True,
            description="inspect a restore point's guest and give the preflight verdict",
        ),
        JobSpec(
            "convert",
            _convert,
            needs_machine=True,
            description="convert a restore point onto a throw-away overlay",
        ),
        JobSpec(
            "bootverify",
            _bootverify,
            singleton=True,  # one at a time; holds no machine lock: syncs go on
            description="convert a restore point on throw-away overlays, boot it with no "
            "network, run its readiness checks, mark it bootable or not",
        ),
        JobSpec(
            "probe",
            run_probe,
            singleton=True,
            description="probe KVM and pick the accelerator for guests and libguestfs",
        ),
        JobSpec("discover", run_discover, description="list the machines of a source"),
        JobSpec(
            "sync",
            _sync,
            resumable=True,
            needs_machine=True,
            description="copy a machine's changed blocks into a new restore point",
        ),
        JobSpec(
            "seed-export",
            _seed_export,
            resumable=True,
            description="write a restore point to removable media as an encrypted seed "
            "(no machine lock: syncs go on)",
        ),
        JobSpec(
            "seed-import",
            _seed_import,
            resumable=True,
            needs_machine=True,
            description="make a seed the machine's first restore point",
        ),
        JobSpec(
            "seed-verify",
            _seed_verify,
            resumable=True,
            description="read and check every chunk of a seed",
        ),
        JobSpec(
            "verify",
            _verify,
            needs_machine=True,
            description="re-read a restore point and compare it with its hashes",
        ),
    ]
