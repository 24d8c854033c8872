"""Boot-verified and pre-converted restore points through a real ferrymand, libvirtd (TCG),
libguestfs and an NBD source (qemu-nbd over a qcow2 overlay of the VMware-like guest).

One scenario, so that the guest boots only four times:

    kernel removed on the source (libguestfs)  -> sync -> point 1 verified automatically
                                                   (every-sync): NOT bootable (the converter
                                                   refuses it, no boot), report kept
    kernel back, init=/bin/false on its line   -> sync -> point 2: converted, booted with no
                                                   NIC, kernel panic: NOT bootable, console
                                                   log kept
    a good guest again                         -> sync -> point 3: bootable, console log kept,
                                                   kept pre-converted
    a sync while point 3 is being verified     -> point 4: verification skipped, event
    test run of a plan asking "latest-verified" -> point 3, no conversion step: RTO = boot
    cutover --use-preconverted                 -> last delta skipped, point 3 boots without a
                                                   conversion, the RPO accepted is reported;
                                                   rolled back

Every sync ends with the proof: the restore point equals the source, block for block.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.daemon import Env
from tests.helpers.nbdsrc import assert_equal
from tests.integration.test_plans_daemon import (
    NbdExport,
    PlansDaemon,
    libvirt_names,
    readers_left,
    store_tag,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3600)]

MACHINE = "web01"
HOSTNAME = "web01bv"


def bootverify_plan(
    restore_point: str = "latest-verified", tcp_port: int | None = None
) -> dict[str, Any]:
    checks: list[dict[str, Any]] = [
        {
            "type": "console",
            "pattern": rf"FERRYMAN-BOOT-OK .*block=virtio_blk.*host={HOSTNAME}",
            "timeout_s": 900,
        }
    ]
    if tcp_port is not None:  # needs a network: a boot verification leaves it to test runs
        checks.append({"type": "tcp", "address": "127.0.0.1", "port": tcp_port, "timeout_s": 30})
    return {
        "format": 1,
        "name": "bv",
        "machines": [
            {
                "machine": MACHINE,
                "rank": 1,
                "restore_point": restore_point,
                "memory_mib": 1024,
                "hostname": HOSTNAME,
                "checks": checks,
            }
        ],
    }


def fresh_source(image: Path, path: Path) -> None:
    path.unlink(missing_ok=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image), "-F", "qcow2", str(path)],
        check=True,
    )


class Guest:
    """The source disk opened read-write with libguestfs (the export is stopped meanwhile)."""

    def __init__(self, path: Path) -> None:
        import guestfs

        self.g = guestfs.GuestFS(python_return_dict=True)
        self.g.add_drive_opts(str(path), format="qcow2", readonly=False)
        self.g.launch()
        root = self.g.inspect_os()[0]
        mps = self.g.inspect_get_mountpoints(root)
        for mp, dev in sorted(mps.items(), key=lambda x: len(x[0])):
            self.g.mount(dev, mp)

    def __enter__(self) -> Any:
        return self.g

    def __exit__(self, *exc: object) -> None:
        try:
            self.g.umount_all()
            self.g.shutdown()
        finally:
            self.g.close()


def remove_kernels(path: Path) -> list[str]:
    """The source guest loses every kernel (a broken update, a careless clean-up)."""
    with Guest(path) as g:
        gone = list(g.glob_expand("/boot/vmlinuz*"))
        for f in gone:
            g.rm_f(f)
    assert gone, "the guest image has no /boot/vmlinuz* to remove"
    return gone


def break_init(path: Path) -> None:
    """A bad kernel parameter: init=/bin/false. The guest converts fine, the kernel boots,
    and init exits at once: 'Kernel panic - not syncing: Attempted to kill init!'."""
    with Guest(path) as g:
        text = g.cat("/etc/default/grub")
        assert 'GRUB_CMDLINE_LINUX="' in text
        g.write(
            "/etc/default/grub",
            text.replace('GRUB_CMDLINE_LINUX="', 'GRUB_CMDLINE_LINUX="init=/bin/false ', 1),
        )


def wait_bootverify(env: Env, rp_id: int, timeout: float = 1800) -> dict[str, Any]:
    """The automatic verification of point ``rp_id`` (started by the scheduler's tick)."""
    end = time.monotonic() + timeout
    with env.client() as c:
        while time.monotonic() < end:
            jobs = [
                j
                for j in c.jobs(limit=50)
                if j["kind"] == "bootverify" and j["params"].get("restore_point") == rp_id
            ]
            if jobs and jobs[0]["state"] not in ("queued", "running"):
                return jobs[0]
            time.sleep(2)
    raise AssertionError(f"no finished boot verification of point {rp_id} in {timeout} s")


def sync(env: Env, src: Path) -> dict[str, Any]:
    with env.client() as c:
        job = c.wait(c.sync(MACHINE)["id"], timeout=900)
        assert job["state"] == "succeeded", job
        rp = c.restore_points(MACHINE)[-1]
    assert_equal(src, Path(rp["disks"][0]["path"]), fmt="qcow2")  # block for block
    return rp  # type: ignore[no-any-return]


def settle(c: Any, run_id: int) -> dict[str, Any]:
    """Until a cutover waits for the operator again (or ended)."""
    c.wait_run(
        run_id,
        until=("awaiting", "failed", "interrupted", "committed", "rolled-back"),
        timeout=1800,
    )
    return dict(c.cutover_status(run_id))


def point(env: Env, rp_id: int) -> dict[str, Any]:
    with env.client() as c:
        return next(r for r in c.restore_points(MACHINE) if r["id"] == rp_id)


def test_not_bootable_then_bootable_then_failover_without_conversion(
    fm_env: Env, tmp_path: Path, vmware_like_image: Path
) -> None:
    src = tmp_path / "web01.qcow2"
    fresh_source(vmware_like_image, src)
    removed = remove_kernels(src)
    exp = NbdExport(src, tmp_path / "web01.sock", fmt="qcow2")
    service = socket.create_server(("127.0.0.1", 0))  # what the plan's tcp check reaches
    port = service.getsockname()[1]
    daemon = PlansDaemon(fm_env)
    kept = fm_env.state_dir / "boot-verify" / MACHINE

    def new_source(*breakage: Any) -> NbdExport:
        exp.stop()
        fresh_source(vmware_like_image, src)
        for fn in breakage:
            fn(src)
        return NbdExport(src, tmp_path / "web01.sock", fmt="qcow2")

    try:
        with fm_env.client() as c:
            c.add_source("lab", "nbd", exp.uri, params={"name": MACHINE})
            c.wait(c.discover("lab")["id"], timeout=120)
            c.protect(MACHINE)
            m = c.set_boot_verify(MACHINE, "every-sync")
            assert m["boot_verify"] == "every-sync"
            c.save_plan("bv", bootverify_plan(tcp_port=port))  # valid: verified from now on

        # -- point 1: no kernel: the converter refuses, no boot needed ----------------------
        rp1 = sync(fm_env, src)
        job1 = wait_bootverify(fm_env, rp1["id"])
        assert job1["state"] == "succeeded", job1
        r1 = job1["result"]
        assert r1["boot_verified"] == "not-bootable", r1
        assert "no kernel found under /boot" in r1["detail"], r1
        p1 = point(fm_env, rp1["id"])
        assert p1["boot_verified"] == "not-bootable" and p1["boot_verified_at"]
        report1 = json.loads((kept / f"rp{rp1['id']}.json").read_text())
        assert report1["verdict"] == "not-bootable"
        assert report1["detail"] == p1["boot_report"]["detail"] == r1["detail"]

        # -- point 2: kernel back, init=/bin/false: converted, booted, panics ---------------
        exp = new_source(break_init)
        rp2 = sync(fm_env, src)
        job2 = wait_bootverify(fm_env, rp2["id"])
        assert job2["state"] == "succeeded", job2
        r2 = job2["result"]
        assert r2["boot_verified"] == "not-bootable", json.dumps(r2, indent=1)
        assert "the console shows" in r2["detail"] and "Kernel panic" in r2["detail"], r2
        console2 = Path(r2["console_log"])
        assert console2 == kept / f"rp{rp2['id']}.console.log"
        text2 = console2.read_text(errors="replace")
        assert "init=/bin/false" in text2 and "Attempted to kill init" in text2
        assert point(fm_env, rp2["id"])["boot_verified"] == "not-bootable"
        with fm_env.client() as c:
            assert c.preconverted() == []  # nothing bootable yet: nothing kept
        assert readers_left(fm_env) == []  # the failed overlays and their readers went

        # -- point 3: a good guest; point 4 synced while point 3 boots ----------------------
        exp = new_source()
        rp3 = sync(fm_env, src)
        end = time.monotonic() + 120
        with fm_env.client() as c:
            while not any(
                j["kind"] == "bootverify" and j["params"].get("restore_point") == rp3["id"]
                for j in c.jobs(active=True)
            ):
                assert time.monotonic() < end, "no boot verification started after the sync"
                time.sleep(1)
        rp4 = sync(fm_env, src)  # the source is unchanged: a hash-compare delta
        job3 = wait_bootverify(fm_env, rp3["id"])
        assert job3["state"] == "succeeded", job3
        r3 = job3["result"]
        assert r3["boot_verified"] == "bootable", json.dumps(r3, indent=1)
        assert r3["preconverted"] is True and r3["plan"] == "bv"
        assert r3["checks_skipped"] == [f"tcp 127.0.0.1:{port}"]  # no network in a verification
        assert r3["convert_s"] > 5 and r3["boot_s"] > 5, r3  # a real conversion, a real boot
        text3 = Path(r3["console_log"]).read_text(errors="replace")
        assert f"host={HOSTNAME}" in text3 and "block=virtio_blk" in text3
        assert "net= ip=" in text3, "the verified guest had a NIC"
        # Point 4 was sealed while point 3 was being verified: skipped, with an event.
        p4 = point(fm_env, rp4["id"])
        assert p4["boot_verified"] is None
        assert "job " in (p4["boot_report"] or {}).get("skipped", ""), p4["boot_report"]
        with fm_env.client() as c:
            events = [e["message"] for e in c.events(limit=2000)]
        assert any(
            f"boot verification of restore point {rp4['id']}" in e and "skipped" in e
            for e in events
        ), events
        # The converted overlay of point 3 is kept, holding a reader on its chain point.
        with fm_env.client() as c:
            pre = c.preconverted()
        assert [(p["restore_point_id"], p["state"]) for p in pre] == [(rp3["id"], "current")]
        assert all(Path(d["path"]).exists() for d in pre[0]["disks"])
        holders = [json.loads(f.read_text())["holder"] for f in readers_left(fm_env)]
        assert holders == [f"converted overlay {pre[0]['disks'][0]['path']}"], holders
        assert libvirt_names(f"fm-{store_tag(fm_env)}-") == {"domains": [], "networks": []}

        # -- failover test run from the pre-converted point ---------------------------------
        with fm_env.client() as c:
            run = c.test_run("bv")
            run = c.wait_run(
                run["id"], until=("succeeded", "failed", "cancelled", "interrupted"), timeout=1800
            )
        rep = run["report"]
        assert run["state"] == "succeeded", json.dumps(rep, indent=1)[-3000:]
        mr = rep["machines"][MACHINE]
        assert mr["restore_point"]["id"] == rp3["id"]  # latest-verified: not 4, 2 or 1
        assert mr["conversion"]["backend"] == "preconverted", mr["conversion"]
        assert mr["conversion"]["preconverted"]["restore_point"] == rp3["id"]
        ph = mr["phases"]
        assert ph["convert_s"] < 5, ph  # an overlay, no conversion
        assert ph["boot_s"] > 5, ph
        # RTO measured: almost all of it is the boot.
        assert mr["rto_s"] - ph["boot_s"] - ph["ready_s"] < 60, (mr["rto_s"], ph)
        assert f"host={HOSTNAME}" in mr["checks"][0]["detail"]
        assert rep["cleanup"]["ok"] is True, rep["cleanup"]
        # The test run's overlay is gone; the pre-converted one stays for the next failover.
        assert all(Path(d["path"]).exists() for d in pre[0]["disks"])
        assert len(readers_left(fm_env)) == 1

        # -- cutover from the pre-converted point: the operator accepts its RPO -------------
        with fm_env.client() as c:
            c.set_boot_verify(MACHINE, "off")  # no verification of the final delta's point
            run = c.cutover_start("bv", use_preconverted=True)
            rid = run["id"]
            pre_check = [ch for ch in run["report"]["preflight"] if "pre-converted" in ch["check"]]
            assert [ch["ok"] for ch in pre_check] == [True], run["report"]["preflight"]
            c.cutover_confirm(rid, "final-delta")
            assert settle(c, rid)["next"] == "stop-source"
            c.cutover_confirm(rid, "stop-source")  # guided: last delta, seal, bring-up follow
            st = settle(c, rid)
            crep = st["report"]
            assert st["state"] == "awaiting" and st["next"] == "commit", crep.get("error")
            last = next(x for x in crep["steps"] if x["step"] == "last-delta")
            assert "skipped, pre-converted points used" in last["detail"], last
            acc = crep["rpo_accepted"][MACHINE]
            assert acc["restore_point"] == rp3["id"] and acc["rpo_s"] > 0, acc
            assert crep["points"] == {MACHINE: rp3["id"]}  # not the final delta's newer point
            cm = crep["machines"][MACHINE]
            assert cm["state"] == "ready", cm
            assert cm["conversion"]["backend"] == "preconverted", cm["conversion"]
            assert cm["phases"]["convert_s"] < 5, cm["phases"]
            c.cutover_rollback_run(rid)
            assert settle(c, rid)["state"] == "rolled-back"
        assert all(Path(d["path"]).exists() for d in pre[0]["disks"])
        assert len(readers_left(fm_env)) == 1
        print(
            f"\ncutover from the pre-converted point: downtime {crep.get('downtime_s')} s "
            f"(boot {cm['phases']['boot_s']} s), RPO accepted {acc['rpo_s']} s"
        )
        print(
            f"\nremoved kernels {removed}; point {rp3['id']} verified: convert "
            f"{r3['convert_s']} s, boot {r3['boot_s']} s; test run from the pre-converted "
            f"point: RTO {mr['rto_s']} s (boot {ph['boot_s']} s, ready {ph['ready_s']} s)"
        )
    finally:
        service.close()
        daemon.stop()
        exp.stop()
    assert libvirt_names(f"fm-{store_tag(fm_env)}-") == {"domains": [], "networks": []}
