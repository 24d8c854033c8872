"""A two-tier plan test-run end to end on real libvirtd (TCG): "db" in rank 1, "app" in
rank 2 waiting for db's readiness. Both are VMware-like Debian guests (they boot on SATA
only) replicated from NBD exports, converted on overlays of their restore points, booted on
virtio on an isolated network with their plan addresses and host names, then removed.

``two_tier_run`` is also the scenario of the plan_rto_overhead benchmark.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import Env
from tests.integration.test_plans_daemon import (
    NbdExport,
    PlansDaemon,
    libvirt_names,
    readers_left,
    replicate,
    store_tag,
)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(2400)]


def guest_image() -> Path:
    sys.path.insert(0, str(ROOT / "images" / "guests"))
    import builder  # type: ignore[import-not-found]

    return Path(builder.build("vmware-like"))


def two_tier_plan(hook_log: Path) -> dict[str, Any]:
    def machine(name: str, rank: int, ip: str, **kw: Any) -> dict[str, Any]:
        return {
            "machine": name,
            "rank": rank,
            "cpus": 1,
            "memory_mib": 1024,
            "hostname": f"{name}01",
            "nics": [{"network": "lan", "mac": "new", "address": f"{ip}/24"}],
            "checks": [
                {
                    "type": "console",
                    "pattern": rf"FERRYMAN-BOOT-OK .*block=virtio_blk.*host={name}01",
                    "timeout_s": 900,
                },
                {"type": "delay", "seconds": 1},
            ],
            **kw,
        }

    return {
        "format": 1,
        "name": "shop",
        "description": "database first, then the application that needs it",
        "networks": [{"name": "lan", "mode": "isolated", "subnet": "10.232.0.0/24"}],
        "machines": [
            machine("db", 1, "10.232.0.10"),
            machine("app", 2, "10.232.0.11", depends_on=["db"]),
        ],
        "hooks": [
            {
                "when": "before",
                "rank": 2,
                "command": f'echo "before rank $FERRYMAN_RANK: $FERRYMAN_MACHINES" >> {hook_log}',
            },
            {"when": "after", "rank": 1, "command": f'echo "after rank 1" >> {hook_log}'},
        ],
    }


def two_tier_run(env: Env, work: Path) -> dict[str, Any]:
    """Replicate db and app, save the plan, test-run it; returns the finished run."""
    img = guest_image()
    exports = [NbdExport(img, work / f"{n}.sock", fmt="qcow2") for n in ("db", "app")]
    daemon = PlansDaemon(env)
    try:
        for n, exp in zip(("db", "app"), exports, strict=True):
            replicate(env, f"src-{n}", exp.uri, n)
        with env.client() as c:
            c.save_plan("shop", two_tier_plan(work / "hooks.log"))
            run = c.test_run("shop")
            return c.wait_run(
                run["id"], until=("succeeded", "failed", "cancelled", "interrupted"), timeout=2400
            )
    finally:
        daemon.stop()
        for exp in exports:
            exp.stop()


def test_two_tier_plan_test_run(fm_env: Env, tmp_path: Path) -> None:
    run = two_tier_run(fm_env, tmp_path)
    rep = run["report"]
    assert run["state"] == "succeeded", json.dumps(rep, indent=1)[-4000:]
    db, app = rep["machines"]["db"], rep["machines"]["app"]
    for m in (db, app):
        assert m["state"] == "ready"
        ph = m["phases"]
        assert all(ph[k] is not None and ph[k] >= 0 for k in ph), ph
        assert ph["convert_s"] > 5 and ph["boot_s"] > 5  # a real conversion, a real boot
        assert m["conversion"]["backend"] == "builtin"
        assert [c["passed"] for c in m["checks"]] == [True, True]
    # Order: app started only after db was ready (rank 2 after rank 1, and depends_on).
    db_ready = db["rto_s"]
    app_boot_start = app["rto_s"] - app["phases"]["boot_s"] - app["phases"]["ready_s"]
    assert app_boot_start >= db_ready - 0.01, (db, app)
    # The guests booted on virtio with the plan's host names.
    assert "host=db01" in db["checks"][0]["detail"] and "host=app01" in app["checks"][0]["detail"]
    marker = re.search(r"ip=(\S*)", db["checks"][0]["detail"])
    assert marker and "10.232.0.10/24" in marker.group(1), db["checks"][0]["detail"]
    t = rep["totals"]
    assert t["ready"] == 2 and t["rto_s"] == pytest.approx(max(db["rto_s"], app["rto_s"]))
    assert t["overhead_ratio"] is not None and t["overhead_ratio"] < 1.5, t
    hooks = (tmp_path / "hooks.log").read_text().splitlines()
    assert hooks == ["after rank 1", "before rank 2: app"]
    assert [h["exit"] for h in rep["hooks"]] == [0, 0]
    # Clean-up complete.
    assert rep["cleanup"]["ok"] is True, rep["cleanup"]
    assert libvirt_names(f"fm-{store_tag(fm_env)}-") == {"domains": [], "networks": []}
    assert readers_left(fm_env) == []
    assert not any((fm_env.root / "volumes" / "plan-runs").glob("run-*"))
    text = (Path(rep["export_dir"]) / "report.txt").read_text()
    assert "RTO" in text and "db" in text and "app" in text and "clean-up: complete" in text
