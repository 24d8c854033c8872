"""Cutover state machine through ferrymand with an NBD source (no power control: the operator
stops the machine and says so by confirming stop-source). The target is a real libvirt
domain (TCG) on a persistent isolated network; the disk needs no conversion and readiness is
a delay, so the whole machine runs in minutes: preflight refusals, confirmations in order,
guided bring-up with downtime, commit; a second plan rolled back after the stop.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from appliance.errors import FerrymanError
from appliance.units import MiB
from tests.helpers.daemon import Env
from tests.helpers.evidence import check_pack, check_tamper_and_foreign
from tests.integration.test_plans_daemon import (
    NbdExport,
    PlansDaemon,
    libvirt_names,
    readers_left,
    replicate,
    store_tag,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]


@pytest.fixture
def source(tmp_path: Path) -> Iterator[NbdExport]:
    img = tmp_path / "src.raw"
    with open(img, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(2 * MiB)
        f.write(os.urandom(MiB))
    exp = NbdExport(img, tmp_path / "src.sock")
    yield exp
    exp.stop()


def remove_store_objects(env: Env) -> None:
    """Production domains and networks a committed cutover of this store left (by its tag)."""
    with contextlib.suppress(Exception):
        tag = store_tag(env)
        conn = libvirt.open("qemu:///system")
        for d in conn.listAllDomains(0):
            if d.name().startswith(f"fm-{tag}-"):
                with contextlib.suppress(libvirt.libvirtError):
                    if d.isActive():
                        d.destroy()
                    d.undefine()
        for n in conn.listAllNetworks(0):
            if n.name().startswith(f"fm-{tag}-"):
                with contextlib.suppress(libvirt.libvirtError):
                    if n.isActive():
                        n.destroy()
                    n.undefine()
        conn.close()


def settle(c: Any, run_id: int) -> dict[str, Any]:
    c.wait_run(
        run_id,
        until=("awaiting", "failed", "interrupted", "committed", "rolled-back"),
        timeout=900,
    )
    return dict(c.cutover_status(run_id))


def plan(name: str, subnet: str) -> dict[str, Any]:
    return {
        "format": 1,
        "name": name,
        "networks": [{"name": "lan", "mode": "isolated", "subnet": subnet}],
        "machines": [
            {
                "machine": "web01",
                "rank": 1,
                "conversion": "none",
                "memory_mib": 256,
                "nics": [{"network": "lan", "mac": "new"}],
                "checks": [{"type": "delay", "seconds": 2}],
            }
        ],
    }


def test_cutover_steps_commit_and_rollback(fm_env: Env, source: NbdExport, tmp_path: Path) -> None:
    d = PlansDaemon(fm_env)
    try:
        replicate(fm_env, "lab", source.uri, "web01")
        with fm_env.client() as c:
            c.save_plan("go", plan("go", "10.233.0.0/24"))
            c.save_plan("back", plan("back", "10.234.0.0/24"))
            c.set_machine("web01", rpo_seconds=7200)

            # rollback after the stop (step mode)
            run = c.cutover_start("back", mode="step")
            rid = run["id"]
            assert run["next"] == "final-delta" and run["confirm"].endswith(f"{rid} final-delta")
            with pytest.raises(FerrymanError) as e:
                c.cutover_start("go")  # the machine is in an open cutover
            assert "no other cutover" in str(e.value)
            # A (scheduled) sync still running when final-delta is confirmed: the cutover
            # waits for it instead of failing, then takes its own delta.
            c.set_machine("web01", throttle_bps=4 * MiB)  # 32 MiB read: about 8 s
            busy = c.sync("web01")["id"]
            c.cutover_confirm(rid, "final-delta")
            assert settle(c, rid)["next"] == "stop-source"
            assert c.job(busy)["state"] == "succeeded", c.job(busy)
            c.set_machine("web01", clear_throttle=True)
            c.cutover_confirm(rid, "stop-source")
            st = settle(c, rid)
            assert st["next"] == "last-delta"
            assert st["report"]["sources"]["web01"]["action"] == "manual"
            assert c.machine("web01")["rpo_seconds"] is None
            # The TUI's calls: by plan name, confirmed by typing it.
            with pytest.raises(FerrymanError) as e:
                c.cutover("back", step="last-delta", confirm="bak")
            assert "does not match plan 'back'" in str(e.value)
            c.cutover("back", step="last-delta", confirm="back")
            assert settle(c, rid)["next"] == "seal"
            c.cutover_rollback("back", step="last-delta")
            st = settle(c, rid)
            assert st["state"] == "rolled-back", st
            assert "start the source by hand" in st["report"]["steps"][-1]["detail"]
            assert c.machine("web01")["rpo_seconds"] == 7200
            back = check_pack(fm_env, rid, tmp_path, outcome="rolled-back")
            assert back["run"]["steps"][-1]["step"] == "rollback"
            acts = [a["action"] for a in back["operator_actions"]["actions"]]
            assert acts[0] == "cutover.start" and acts[-1] == "cutover.rollback", acts

            # guided cutover to commit
            run = c.cutover_start("go")
            rid = run["id"]
            c.cutover_confirm(rid, "final-delta")
            assert settle(c, rid)["next"] == "stop-source"
            c.cutover_confirm(rid, "stop-source")
            st = settle(c, rid)
            rep = st["report"]
            assert st["state"] == "awaiting" and st["next"] == "commit", rep.get("error")
            assert [s["step"] for s in rep["steps"]][-3:] == ["last-delta", "seal", "bring-up"]
            m = rep["machines"]["web01"]
            assert m["state"] == "ready" and m["restore_point"]["id"] == rep["points"]["web01"]
            assert rep["downtime_s"] >= m["phases"]["boot_s"] + m["phases"]["ready_s"]
            tag = store_tag(fm_env)
            live = libvirt_names(f"fm-{tag}-c{rid}-")
            assert live == {
                "domains": [f"fm-{tag}-c{rid}-web01"],
                "networks": [f"fm-{tag}-c{rid}-lan"],
            }
            conn = libvirt.open("qemu:///system")
            try:
                dom = conn.lookupByName(f"fm-{tag}-c{rid}-web01")
                assert dom.isActive() and dom.isPersistent() and dom.autostart()
            finally:
                conn.close()
            assert readers_left(fm_env)  # the production disk reads the sealed point
            c.cutover_confirm(rid, "commit")
            st = settle(c, rid)
            assert st["state"] == "committed"
            assert c.machine("web01")["cutover_done"] == 1
            assert c.machine("web01")["protected"] is False
            with pytest.raises(FerrymanError) as e:
                c.cutover_rollback_run(rid)
            assert "committed" in str(e.value)
            text = c.cutover_report_text(rid)
            assert "downtime" in text and "step commit: done" in text
            pack = check_pack(fm_env, rid, tmp_path, outcome="committed", source=source.img)
            assert pack["summary"]["downtime_s"] == rep["downtime_s"]
            ev_m = pack["rto"]["machines"]["web01"]
            assert (ev_m["boot_s"], ev_m["rto_s"]) == (m["phases"]["boot_s"], m["rto_s"])
            assert pack["rpo"]["machines"]["web01"]["rpo_s"] == 0.0  # taken after the stop
            assert [p["check"] for p in pack["preflight"]["plan"]][:1] == ["libvirt"]
            steps = [
                a["params"].get("step")
                for a in pack["operator_actions"]["actions"]
                if a["action"] == "cutover.confirm" and a["who"] == "root" and a["origin"]
            ]
            assert steps == ["final-delta", "stop-source", "commit"], steps
            check_tamper_and_foreign(fm_env, rid, tmp_path)
            # The first cutover left nothing: its network never existed, its disks are gone.
            assert libvirt_names(f"fm-{tag}-c{run['id'] - 1}-") == {"domains": [], "networks": []}
    finally:
        d.stop()
        remove_store_objects(fm_env)
