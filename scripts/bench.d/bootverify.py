"""Benchmark preconverted_rto_ratio: what a pre-converted restore point saves on a failover.

One VMware-like Debian guest (SATA only until converted) replicated from an NBD source
through a real ferrymand; its point is boot-verified once (converted, booted with no network,
kept pre-converted). Then test runs of the same one-machine plan, alternating:

    ours        test run that boots the pre-converted point (no conversion step)
    reference   test run with --convert: the same point converted on the RTO path

Both measure RTO from run start to readiness (the boot marker on virtio with the plan's host
name), on the same machine in the same run. Median of ``BENCH_BOOTVERIFY_RUNS`` (default 2)
of each, interleaved so that load changes hit both alike. ratio = ours / reference; goal
<= 0.75 (conversion is the part of a failover a pre-converted point removes).
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
IDS = ["preconverted_rto_ratio"]
GOAL = 0.75
DONE = ("succeeded", "failed", "cancelled", "interrupted")


def _scenario(env: Any, work: Path, runs: int) -> dict[str, Any]:
    from tests.e2e.test_bootverify import MACHINE, bootverify_plan, fresh_source
    from tests.images_fixtures import build_image
    from tests.integration.test_plans_daemon import NbdExport, PlansDaemon

    src = work / "web01.qcow2"
    fresh_source(build_image("vmware-like"), src)
    exp = NbdExport(src, work / "web01.sock", fmt="qcow2")
    daemon = PlansDaemon(env)
    out: dict[str, Any] = {"pre": [], "plain": [], "runs": []}
    try:
        with env.client() as c:
            c.add_source("lab", "nbd", exp.uri, params={"name": MACHINE})
            c.wait(c.discover("lab")["id"], timeout=120)
            c.protect(MACHINE)
            c.save_plan("bv", bootverify_plan("latest"))
            job = c.wait(c.sync(MACHINE)["id"], timeout=900)
            if job["state"] != "succeeded":
                raise RuntimeError(f"sync failed: {job.get('error')}")
            job = c.wait(c.verify_boot(MACHINE)["id"], timeout=1800)
            res = job.get("result") or {}
            if job["state"] != "succeeded" or res.get("boot_verified") != "bootable":
                raise RuntimeError(f"boot verification failed: {job.get('error') or res}")
            out["verify"] = {k: res.get(k) for k in ("convert_s", "boot_s", "restore_point")}
            for _ in range(runs):
                for kind in ("pre", "plain"):
                    run = c.test_run("bv", preconverted=kind == "pre")
                    run = c.wait_run(run["id"], until=DONE, timeout=2400)
                    m = run["report"]["machines"][MACHINE]
                    if run["state"] != "succeeded":
                        raise RuntimeError(
                            f"test run {run['id']} ({kind}) {run['state']}: "
                            f"{run['report'].get('error')}"
                        )
                    backend = (m.get("conversion") or {}).get("backend")
                    if (backend == "preconverted") != (kind == "pre"):
                        raise RuntimeError(f"test run {run['id']} ({kind}) used {backend}")
                    out[kind].append(float(m["rto_s"]))
                    out["runs"].append(
                        f"{kind}: RTO {m['rto_s']} s (convert {m['phases']['convert_s']} s, "
                        f"boot {m['phases']['boot_s']} s)"
                    )
    finally:
        daemon.stop()
        exp.stop()
    return out


def run(ids: list[str]) -> list[dict[str, Any]]:
    if "preconverted_rto_ratio" not in ids:
        return []
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
    os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
    from tests.helpers.daemon import scratch_env

    runs = int(os.environ.get("BENCH_BOOTVERIFY_RUNS", "2"))
    load0 = os.getloadavg()[0]
    with scratch_env("ferryman-bench-bootverify-") as env:
        r = _scenario(env, env.root, runs)
    ours = statistics.median(r["pre"])
    ref = statistics.median(r["plain"])
    detail = (
        f"median of {runs} each, interleaved; "
        + "; ".join(r["runs"])
        + f"; boot verification: convert {r['verify']['convert_s']} s, boot "
        f"{r['verify']['boot_s']} s; load average {load0:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end"
    )
    return [
        {
            "id": "preconverted_rto_ratio",
            "ours": round(ours, 1),
            "reference": round(ref, 1),
            "ratio": round(ours / ref, 3) if ref else None,
            "goal": GOAL,
            "unit": "s",
            "detail": detail,
        }
    ]
