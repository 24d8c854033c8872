"""Cutover of a running libvirt source VM on real libvirtd (TCG), through ferrymand.

The source is a VMware-like Debian guest (an overlay of the test image, booting on SATA)
protected through the libvirt adapter (pull-mode backups with checkpoints). One test, one
source VM, two cutovers:

1. step mode: final delta while it runs, stop the source, then ROLL BACK from the step after
   the stop: the source runs again, nothing of the target is left, continuous protection is
   restored.
2. guided mode: final delta, stop (ACPI shutdown), last delta read from the VM started paused,
   seal, convert, boot on the production network (a bridge), readiness; downtime reported;
   commit: the machine is cut over, unprotected, never synced again, no rollback.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from appliance.errors import FerrymanError
from tests.e2e.test_testrun_two_tier import guest_image
from tests.helpers.daemon import Env
from tests.integration.test_plans_daemon import PlansDaemon, libvirt_names, store_tag

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3000)]
MARKER = b"FERRYMAN-BOOT-OK"


class SourceVM:
    def __init__(self, conn: Any, name: str, disk: Path, console: Path) -> None:
        self.conn, self.name, self.disk, self.console = conn, name, disk, console

    @property
    def dom(self) -> Any:
        return self.conn.lookupByName(self.name)

    def running(self) -> bool:
        return bool(self.dom.isActive()) and self.dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING

    def wait_booted(self, since: int = 0, timeout: float = 900) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            data = self.console.read_bytes() if self.console.exists() else b""
            if MARKER in data[since:]:
                return
            time.sleep(1)
        raise TimeoutError(f"source VM did not boot: {data[-1500:]!r}")

    def console_size(self) -> int:
        return self.console.stat().st_size if self.console.exists() else 0


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A running source VM and a production bridge (an isolated libvirt network)."""
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open("qemu:///system")
    tag = uuid.uuid4().hex[:6]
    name = f"fmcut-{tag}-erp"
    bridge = f"fmcp{tag}"
    disk = tmp_path / "erp.qcow2"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(guest_image()),
            "-F",
            "qcow2",
            str(disk),
        ],
        check=True,
    )
    console = tmp_path / "erp.console.log"
    conn.networkCreateXML(
        f"<network><name>fmcut-{tag}-prod</name><bridge name='{bridge}'/></network>"
    )
    xml = f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>1024</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{disk}'/><target dev='sda' bus='sata'/>
    </disk>
    <interface type='network'><source network='fmcut-{tag}-prod'/>
      <mac address='52:54:00:c0:ff:01'/><model type='e1000'/></interface>
    <serial type='file'><source path='{console}' append='on'/></serial>
    <video><model type='vga'/></video>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>"""
    conn.defineXML(xml).create()
    vm = SourceVM(conn, name, disk, console)
    try:
        yield {"vm": vm, "bridge": bridge, "conn": conn, "tag": tag}
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            d = conn.lookupByName(name)
            if d.isActive():
                d.destroy()
            d.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA)
        with contextlib.suppress(libvirt.libvirtError):
            conn.networkLookupByName(f"fmcut-{tag}-prod").destroy()
        conn.close()


def cutover_targets_cleanup(fm_env: Env) -> None:
    """Remove this store's production domains (the test's, by its instance tag)."""
    with contextlib.suppress(Exception):
        tag = store_tag(fm_env)
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
                    n.destroy()
                    n.undefine()
        conn.close()


def settle(c: Any, run_id: int) -> dict[str, Any]:
    c.wait_run(
        run_id,
        until=("awaiting", "failed", "interrupted", "committed", "rolled-back"),
        timeout=2400,
    )
    return dict(c.cutover_status(run_id))


def test_cutover_with_rollback_then_commit(fm_env: Env, lab: dict[str, Any]) -> None:
    vm: SourceVM = lab["vm"]
    daemon = PlansDaemon(fm_env)
    try:
        with fm_env.client() as c:
            c.add_source("kvm", "libvirt", "qemu:///system")
            for _ in range(3):  # other tests' transient domains may vanish mid-discovery
                if c.wait(c.discover("kvm")["id"], timeout=120)["state"] == "succeeded":
                    break
            c.protect(vm.name, rpo_seconds=3600)
            first = c.wait(c.sync(vm.name)["id"], timeout=900)
            assert first["state"] == "succeeded", first
            plan = {
                "format": 1,
                "name": "erp",
                "networks": [{"name": "prod", "mode": "bridged", "bridge": lab["bridge"]}],
                "machines": [
                    {
                        "machine": vm.name,
                        "rank": 1,
                        "cpus": 1,
                        "memory_mib": 1024,
                        "hostname": "erp01",
                        "nics": [{"network": "prod", "mac": "keep"}],
                        "checks": [
                            {
                                "type": "console",
                                "pattern": r"FERRYMAN-BOOT-OK .*block=virtio_blk.*host=erp01",
                                "timeout_s": 900,
                            }
                        ],
                    }
                ],
            }
            c.save_plan("erp", plan)
            vm.wait_booted()

            # -- 1: step mode, rollback after the source was stopped ----------------------
            run = c.cutover_start("erp", mode="step", shutdown_timeout_s=30)
            rid = run["id"]
            assert run["state"] == "awaiting" and run["next"] == "final-delta"
            assert all(p["ok"] for p in run["report"]["preflight"])
            with pytest.raises(FerrymanError) as e:
                c.cutover_confirm(rid, "stop-source")  # out of order
            assert "waits for 'final-delta'" in str(e.value)
            c.cutover_confirm(rid, "final-delta")
            st = settle(c, rid)
            assert st["state"] == "awaiting" and st["next"] == "stop-source", st
            fd = st["report"]["final_delta"][vm.name]
            assert fd["full"] is False  # an incremental while the source runs
            assert c.machine(vm.name)["rpo_seconds"] == 3600
            c.cutover_confirm(rid, "stop-source")
            st = settle(c, rid)
            assert st["state"] == "awaiting" and st["next"] == "last-delta", st
            assert st["report"]["sources"][vm.name]["action"] in ("guest-shutdown", "power-off")
            assert not vm.dom.isActive()
            assert c.machine(vm.name)["rpo_seconds"] is None  # protection paused
            mark = vm.console_size()
            c.cutover_rollback_run(rid)
            st = settle(c, rid)
            assert st["state"] == "rolled-back", st
            assert vm.running()  # the source runs again
            assert c.machine(vm.name)["rpo_seconds"] == 3600
            assert libvirt_names(f"fm-{store_tag(fm_env)}-c{rid}-")["domains"] == []
            with pytest.raises(FerrymanError):
                c.cutover_confirm(rid, "last-delta")
            assert mark > 0

            # -- 2: guided mode to commit ---------------------------------------------------
            # The source is still booting: the ACPI shutdown may go unheard, and the power-off
            # after the (short) timeout is the path this cutover takes then.
            run = c.cutover_start("erp", shutdown_timeout_s=30)
            rid = run["id"]
            c.cutover_confirm(rid, "final-delta")
            assert settle(c, rid)["next"] == "stop-source"
            c.cutover_confirm(rid, "stop-source")
            st = settle(c, rid)
            rep = st["report"]
            assert st["state"] == "awaiting" and st["next"] == "commit", rep.get("error")
            assert rep["sources"][vm.name]["action"] in ("guest-shutdown", "power-off")
            steps = [(s["step"], s["state"]) for s in rep["steps"]]
            assert steps[-4:] == [
                ("stop-source", "done"),
                ("last-delta", "done"),
                ("seal", "done"),
                ("bring-up", "done"),
            ]
            assert rep["last_delta"][vm.name]["full"] is False
            point = rep["points"][vm.name]
            m = rep["machines"][vm.name]
            assert m["restore_point"]["id"] == point and m["state"] == "ready"
            assert m["conversion"]["backend"] == "builtin"
            assert "host=erp01" in m["checks"][0]["detail"]
            assert rep["downtime_s"] > m["phases"]["boot_s"] > 0
            target = m["domain"]
            dom = lab["conn"].lookupByName(target)
            assert dom.isActive() and dom.isPersistent() and dom.autostart()
            assert "52:54:00:c0:ff:01" in dom.XMLDesc(0)  # mac "keep"
            assert lab["bridge"] in dom.XMLDesc(0)
            assert not vm.dom.isActive()
            text = c.cutover_report_text(rid)
            assert "downtime" in text and "bring-up" in text
            c.cutover_confirm(rid, "commit")
            st = settle(c, rid)
            assert st["state"] == "committed", st
            mach = c.machine(vm.name)
            assert mach["cutover_done"] == 1 and mach["protected"] is False
            with pytest.raises(FerrymanError):
                c.cutover_rollback_run(rid)
            job = c.wait(c.sync(vm.name)["id"], timeout=60)
            assert job["state"] == "failed" and "cut over" in job["error"]
            assert not vm.dom.isActive()  # never started again
            assert dom.isActive()  # the target keeps running
    finally:
        daemon.stop()
        cutover_targets_cleanup(fm_env)
