"""Sync through ferrymand from a real NBD export (qemu-nbd): full, incremental, kill -9.

Each test ends with proof: the restore point equals the source, block for block
(qemu-img compare), the qcow2 passes qemu-img check, the store passes integrity_check.
"""

from __future__ import annotations

import sqlite3
import time

import pytest

from appliance.units import MiB
from tests.helpers.daemon import Daemon, Env, running_daemon
from tests.helpers.nbdsrc import (
    Export,
    assert_equal,
    cli,
    point_path,
    register,
    source,
    write_random,
)

_ = source  # fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def test_full_then_incremental_by_hash_compare(daemon: Daemon, fm_env: Env, source: Export) -> None:
    register(fm_env, source)
    job = cli(fm_env, "sync", "web01", "--wait")
    assert job["state"] == "succeeded" and job["result"]["full"] is True
    assert job["result"]["bytes_written"] <= 4 * (3 * MiB + 12345) + 4 * MiB  # zeros elided
    p1, rp1 = point_path(fm_env, "web01")
    assert_equal(source.img, p1)

    # Change 2 MiB in two places, then an incremental: only changed blocks are written.
    source.stop()
    write_random(source.img, 10 * MiB, MiB, 7)
    write_random(source.img, 60 * MiB, MiB, 8)
    source.start()
    job = cli(fm_env, "sync", "web01", "--wait")
    res = job["result"]
    assert res["full"] is False and res["bytes_written"] == 2 * MiB, res
    p2, rp2 = point_path(fm_env, "web01")
    assert rp2["parent_id"] == rp1["id"] and p2 != p1
    assert_equal(source.img, p2)
    assert (p1.stat().st_mode & 0o222) == 0  # sealed points are read-only

    # Verify re-reads the point against the hashes taken while copying.
    v = cli(fm_env, "verify", str(rp2["id"]), "--wait")
    assert v["result"]["verified"] == "ok"
    machines = cli(fm_env, "machines")
    assert machines[0]["rpo_status"] == "none" and machines[0]["restore_points"] == 2
    con = sqlite3.connect(fm_env.db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


@pytest.mark.row(11)
def test_kill9_mid_sync_resumes_without_recopying(fm_env: Env, source: Export) -> None:
    d = Daemon(fm_env, "--no-probe")
    d.wait_ready()
    try:
        # A fixed snapshot identity: the operator's export does not change between runs, so an
        # interrupted sync may resume; a throttle makes the copy last long enough to kill it.
        register(fm_env, source, "--param", "snapshot_id=export-v1")
        cli(fm_env, "set", "web01", "--throttle", "512KiB")  # ~24 s; flushes every 10 s
        job = cli(fm_env, "sync", "web01")
        end = time.monotonic() + 60
        done = 0
        while time.monotonic() < end:
            con = sqlite3.connect(fm_env.db)
            done = con.execute("SELECT coalesce(sum(length),0) FROM sync_extents").fetchone()[0]
            con.close()
            if done >= 2 * MiB:
                break
            time.sleep(0.2)
        assert done >= 2 * MiB, "no durable extent recorded within 60 s"
        d.kill9()
    finally:
        d.stop()  # only if an assertion failed before the kill
    with running_daemon(fm_env, "--no-probe"):
        cli(fm_env, "set", "web01", "--no-throttle")
        j = cli(fm_env, "job", "show", str(job["id"]), "--wait")
        assert j["state"] == "succeeded", j
        assert j["attempts"] == 2 and j["result"]["resumed"] is True
        assert j["result"]["bytes_skipped_resume"] >= done
        p, _ = point_path(fm_env, "web01")
        assert_equal(source.img, p)
    con = sqlite3.connect(fm_env.db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM restore_points").fetchone()[0] == 1


def test_scheduler_meets_rpo_target(fm_env: Env, source: Export) -> None:
    with running_daemon(fm_env, "--no-probe", "--scheduler-tick", "1"):
        register(fm_env, source)
        cli(fm_env, "set", "web01", "--rpo", "60")
        end = time.monotonic() + 120
        m: dict = {}  # type: ignore[type-arg]
        while time.monotonic() < end:
            m = cli(fm_env, "machines")[0]
            if m["restore_points"] >= 1 and not m["active_job"]:
                break
            time.sleep(0.5)
        assert m["restore_points"] == 1 and m["rpo_status"] == "within", m
        jobs = cli(fm_env, "jobs", "--all")
        sync = [j for j in jobs if j["kind"] == "sync"]
        assert sync[0]["requested_by"] == "scheduler" and sync[0]["state"] == "succeeded"
        # Within half the RPO no second sync is started.
        time.sleep(3)
        assert len([j for j in cli(fm_env, "jobs", "--all") if j["kind"] == "sync"]) == 1
        p, _ = point_path(fm_env, "web01")
        assert_equal(source.img, p)
