"""Benchmark plan_rto_overhead: is time lost between the steps of a test run?

The two-machine plan of tests/e2e/test_testrun_two_tier.py (db in rank 1, app in rank 2
depending on db; both VMware-like Debian guests converted and booted under TCG) is test-run
through a real ferrymand. ``ours`` is the measured total RTO (run start -> every machine
ready); ``reference`` is what the run would take with no time lost between steps: the slowest
conversion plus, for each rank, the slowest boot-to-ready of that rank (both measured in the
same run). ratio = ours / reference; goal <= 1.1. The RTO breakdown per machine is in
``detail``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
IDS = ["plan_rto_overhead"]
GOAL = 1.1


def run(ids: list[str]) -> list[dict[str, Any]]:
    if "plan_rto_overhead" not in ids:
        return []
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    from tests.e2e.test_testrun_two_tier import two_tier_run
    from tests.helpers.daemon import scratch_env

    with scratch_env("ferryman-bench-plan-") as env:
        result = two_tier_run(env, env.root)
    rep = result["report"]
    t = rep.get("totals") or {}
    parts = []
    for name in ("db", "app"):
        m = rep["machines"][name]
        ph = m.get("phases") or {}
        parts.append(
            f"{name}: convert {ph.get('convert_s')} s, wait {ph.get('wait_s')} s, "
            f"boot {ph.get('boot_s')} s, ready {ph.get('ready_s')} s, RTO {m.get('rto_s')} s"
        )
    detail = (
        f"run {result['state']}; "
        + "; ".join(parts)
        + f"; ideal = slowest conversion {t.get('slowest_convert_s')} s + slowest boot per "
        f"rank {t.get('slowest_boot_by_rank_s')}; clean-up "
        f"{(rep.get('cleanup') or {}).get('seconds')} s (not in the RTO)"
    )
    if result["state"] != "succeeded":
        detail += f"; error: {rep.get('error')}"
    return [
        {
            "id": "plan_rto_overhead",
            "ours": t.get("rto_s"),
            "reference": t.get("ideal_s"),
            "ratio": t.get("overhead_ratio"),
            "goal": GOAL,
            "unit": "s",
            "detail": detail,
        }
    ]
