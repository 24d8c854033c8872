"""Job kinds of plans, for ferrymand's runner, and the start-up recovery.

    kinds.all_specs() + plans.jobs.specs()           the daemon's job kinds
    plans.jobs.recover_interrupted(db)               at daemon start, after the store opens

"testrun" holds no machine lock (replication continues during a test run). "cutover" runs
one confirmed step of a cutover (or its rollback); the cutover module keeps the state.
"""

from __future__ import annotations

from typing import Any

from sqlite_utils import Database

from appliance.daemon.jobs import JobContext, JobSpec


def _testrun(ctx: JobContext) -> dict[str, Any]:
    from appliance.plans.testrun import run_testrun

    return run_testrun(ctx)


def _cutover(ctx: JobContext) -> dict[str, Any]:
    from appliance.plans.cutover import run_cutover_job

    return run_cutover_job(ctx)


def specs() -> list[JobSpec]:
    return [
        JobSpec(
            "testrun",
            _testrun,
            description="test-run a DR plan on isolated networks: boot, readiness, RTO, clean-up",
        ),
        JobSpec(
            "cutover",
            _cutover,
            description="one confirmed step of a cutover (deltas, stop, bring-up, commit) or "
            "its rollback",
        ),
    ]


def recover_interrupted(db: Database) -> list[dict[str, Any]]:
    """Clean up test runs and mark cutover steps a crashed daemon left open."""
    from appliance.plans.testrun import recover_interrupted as recover

    return recover(db)
