"""scripts/demo: the main job on the built-in lab.

    scripts/demo              set up, start the lab and ferrymand, open the TUI on the dashboard
    scripts/demo --headless   the whole story without the TUI, each step timed:
                              first sync (verified against the source snapshot), a test run
                              with its RTO, a cutover with its downtime
    scripts/demo --reset      remove the lab: its VMs, networks, disks, source and points

ferrymand is started detached: it owns the jobs, so closing the TUI stops nothing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from appliance import lab
from appliance.client import Client
from appliance.config import paths
from appliance.errors import FerrymanError, NotFound

READY_TIMEOUT_S = 120.0
RPO_S = 300  # short, so the dashboard shows the scheduler at work
LAB_NETWORK = f"{lab.PREFIX}-prod"
LAB_BRIDGE = "fmlab0"
BOOT_PATTERN = r"FERRYMAN-BOOT-OK"


class Story:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.last = self.t0

    def step(self, text: str) -> None:
        now = time.monotonic()
        print(f"[{now - self.t0:6.1f} s | +{now - self.last:5.1f} s] {text}", flush=True)
        self.last = now


def ensure_daemon() -> tuple[dict[str, Any], bool]:
    """Return the daemon's health, starting ferrymand first when none answers."""
    try:
        with Client() as c:
            return c.health(), False
    except FerrymanError:
        pass
    p = paths()
    p.log_dir.mkdir(parents=True, exist_ok=True)
    log = p.log_dir / "ferrymand.log"
    ferrymand = Path(sys.executable).parent / "ferrymand"
    with open(p.log_dir / "ferrymand.stderr", "ab") as err:
        subprocess.Popen(
            [str(ferrymand), "--log-file", str(log)],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    end = time.monotonic() + READY_TIMEOUT_S
    last: FerrymanError | None = None
    while time.monotonic() < end:
        try:
            with Client() as c:
                return c.health(), True
        except FerrymanError as e:
            last = e
            time.sleep(0.3)
    raise FerrymanError(
        f"ferrymand did not start within {READY_TIMEOUT_S:.0f} s: {last}",
        hint=f"read {log} and {p.log_dir / 'ferrymand.stderr'}",
    )


def ensure_network() -> None:
    """The lab's "production" LAN: a bridge with no route out, where the cutover boots."""
    import libvirt

    conn = lab._conn()
    try:
        try:
            net = conn.networkLookupByName(LAB_NETWORK)
        except libvirt.libvirtError:
            net = conn.networkDefineXML(
                f"<network><name>{LAB_NETWORK}</name><bridge name='{LAB_BRIDGE}'/></network>"
            )
        if not net.isActive():
            net.create()
    finally:
        conn.close()


def setup_lab(c: Client, story: Story, domain_type: str) -> None:
    if not lab.vm_defined() and not (image := lab.image_path()).exists():
        story.step(
            "building the lab image (first run only: Debian 12 root tree, disk, GRUB; about "
            f"2 min on 2 idle cores without KVM; log {image.with_suffix('.log')})"
        )
    r = lab.start_vm(domain_type)
    story.step(
        f"lab VM {lab.DOMAIN} {'started' if r['started'] else 'already running'} "
        "(vmware-like Debian 12 on SATA, writes 1 MiB every 2 s)"
    )
    ensure_network()
    if not any(s["name"] == lab.SOURCE for s in c.sources()):
        c.add_source(lab.SOURCE, "libvirt", "qemu:///system")
        story.step("source 'lab' registered (libvirt qemu:///system)")
    job = c.wait(c.discover(lab.SOURCE)["id"], timeout=300)
    if job["state"] != "succeeded":
        raise FerrymanError(f"discovery of the lab failed: {job['error']}")
    m = c.machine(lab.DOMAIN)
    if not m["protected"] and not m["cutover_done"]:
        c.protect(lab.DOMAIN, rpo_seconds=RPO_S, verify_every_sync=True)
    story.step(f"{lab.DOMAIN} protected: RPO target {RPO_S} s, every point verified")


def first_sync(c: Client, story: Story) -> dict[str, Any]:
    """Wait for the scheduler's first sync (or start one), printing progress."""
    end = time.monotonic() + 3600
    last_print = 0.0
    while time.monotonic() < end:
        m = next(x for x in c.machines() if x["name"] == lab.DOMAIN)
        if m["restore_points"] >= 1 and not m["active_job"]:
            rp = c.restore_points(lab.DOMAIN)[0]
            story.step(
                f"first restore point {rp['id']}: {rp['consistency']}, verified "
                f"'{rp['verified']}' = equal to the source snapshot block for block"
            )
            return rp
        job = m["active_job"]
        if job is None:
            try:
                c.sync(lab.DOMAIN)
            except FerrymanError:
                pass  # the scheduler got there first
        elif time.monotonic() - last_print > 10:
            p = job["progress"] or {}
            done, total = p.get("done", 0), p.get("total") or 0
            pct = f"{100 * done / total:.0f}%" if total else ""
            story.step(f"  sync: {p.get('phase', job['state'])} {pct}")
            last_print = time.monotonic()
        time.sleep(1)
    raise FerrymanError("the first sync of the lab did not finish within an hour")


def ensure_plan(c: Client, story: Story) -> None:
    try:
        c.plan(lab.PLAN)
        return
    except NotFound:
        pass
    doc = c.new_plan(lab.PLAN, [lab.DOMAIN])
    doc = doc.get("document", doc)
    doc["description"] = "The built-in lab: web01 converted to virtio and booted"
    doc["networks"] = [{"name": "lan", "mode": "bridged", "bridge": LAB_BRIDGE}]
    for m in doc["machines"]:
        m["hostname"] = "web01"
        m["memory_mib"] = lab.MEMORY_MIB
        for n in m.get("nics", []):
            n["network"] = "lan"
        m["checks"] = [{"type": "console", "pattern": BOOT_PATTERN, "timeout_s": 900}]
    c.save_plan(lab.PLAN, doc)
    story.step(f"plan '{lab.PLAN}' saved (rank 1: web01, readiness: boot marker on the console)")


def test_run(c: Client, story: Story) -> dict[str, Any]:
    run = c.test_run(lab.PLAN)
    story.step(f"test run {run['id']} started: overlay, convert, boot on an isolated network")
    run = c.wait_run(
        run["id"], until=("succeeded", "failed", "interrupted", "cancelled"), timeout=3600
    )
    rep = run.get("report") or {}
    if run["state"] != "succeeded":
        raise FerrymanError(
            f"test run {run['id']} {run['state']}: {rep.get('error')}",
            hint=f"ferryman testrun report {run['id']}",
        )
    m = rep["machines"][lab.DOMAIN]
    ph = m.get("phases", {})
    story.step(
        f"test run {run['id']}: RTO {rep['totals']['rto_s']:.0f} s (convert "
        f"{ph.get('convert_s', 0):.0f} s, boot {ph.get('boot_s', 0):.0f} s, ready "
        f"{ph.get('ready_s', 0):.0f} s); cleaned up"
    )
    return run


def cutover(c: Client, story: Story) -> dict[str, Any]:
    def settle(rid: int) -> dict[str, Any]:
        c.wait_run(
            rid,
            until=("awaiting", "failed", "interrupted", "committed", "rolled-back"),
            timeout=3600,
        )
        st = c.cutover_status(rid)
        if st["state"] in ("failed", "interrupted"):
            raise FerrymanError(
                f"cutover {rid} {st['state']}: {(st.get('report') or {}).get('error')}",
                hint=f"ferryman cutover status {rid}",
            )
        return st

    run = c.cutover_start(lab.PLAN, mode="guided", shutdown_timeout_s=60)
    rid = run["id"]
    story.step(f"cutover {rid}: preflight passed")
    c.cutover_confirm(rid, "final-delta")
    settle(rid)
    story.step(f"cutover {rid}: final delta while the source runs")
    c.cutover_confirm(rid, "stop-source")
    st = settle(rid)
    rep = st["report"]
    story.step(
        f"cutover {rid}: source stopped, last delta, sealed, converted, booted on "
        f"{LAB_NETWORK}: downtime {rep['downtime_s']:.0f} s"
    )
    c.cutover_confirm(rid, "commit")
    st = settle(rid)
    story.step(f"cutover {rid} committed: web01 runs on KVM/virtio; the source stays off")
    return st


def reset(c: Client | None, story: Story) -> list[str]:
    """Remove the lab: VMs and networks (lab and its cutover targets), disks, its source,
    machine and restore points. Nothing outside the lab is touched."""
    done: list[str] = []
    if c is not None:
        try:
            m = c.machine(lab.DOMAIN)
            if m["protected"]:
                c.unprotect(lab.DOMAIN)
            c.remove_source(lab.SOURCE, purge=True)
            done.append("source lab, its machine and restore points")
        except NotFound:
            pass
    done += lab.reset()
    prod = paths().volume_dir / "production" / lab.DOMAIN
    if prod.exists():
        shutil.rmtree(prod)
        done.append(f"production disks {prod}")
    story.step("lab reset: " + (", ".join(done) or "nothing to remove"))
    return done


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/demo")
    ap.add_argument("--headless", action="store_true", help="no TUI; print each step timed")
    ap.add_argument("--reset", action="store_true", help="remove the lab and stop")
    args = ap.parse_args(argv)
    story = Story()
    try:
        health, started = ensure_daemon()
        story.step(
            f"ferrymand {'started' if started else 'already running'} "
            f"(pid {health['pid']}, store {health['store']})"
        )
        with Client() as c:
            if args.reset:
                reset(c, story)
                return 0
            probe = health.get("probe") or {}
            setup_lab(c, story, probe.get("domain_type", "qemu"))
            ensure_plan(c, story)  # the TUI's newcomer test-runs and cuts over this plan
            if not args.headless:
                story.step(
                    "opening the TUI on the dashboard: the first sync runs there "
                    "(q quits; ferrymand keeps running)"
                )
                ferryman = Path(sys.executable).parent / "ferryman"
                os.execv(str(ferryman), [str(ferryman)])
            first_sync(c, story)
            test_run(c, story)
            cutover(c, story)
            story.step("done: run 'scripts/demo --reset' to start over")
    except FerrymanError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
