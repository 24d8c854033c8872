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


def all_specs() -> list[JobSpec]:
    return [
        JobSpec(
            "probe",
            run_probe,
            singleton=True,
            description="probe KVM and pick the accelerator for guests and libguestfs",
        ),
    ]
