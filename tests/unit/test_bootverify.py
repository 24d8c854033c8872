"""Boot verification without booting: which checks run with no network, the plan rule for
"latest-verified", the automatic trigger's skip, the policy's limits, and when a
pre-converted point fits a plan. Real SQLite stores (migrations applied); the boots
themselves are in tests/e2e/test_bootverify.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlite_utils import Database

from appliance import bootverify, preconverted
from appliance.daemon.jobs import JobRunner
from appliance.daemon.kinds import all_specs
from appliance.plans.model import Check, Inventory, MachinePlan, validate
from appliance.plans.runner import customisation
from store.db import dumps, now, open_store
from tests.helpers.daemon import Env


def _store(path: Path) -> Database:
    db = open_store(path)
    db.execute(
        "INSERT INTO sources (id, name, kind, uri, created_at, updated_at) "
        "VALUES (1, 'lab', 'nbd', 'nbd://x', ?, ?)",
        [now(), now()],
    )
    db.execute(
        "INSERT INTO machines (id, source_id, ref, name, discovered_at) "
        "VALUES (1, 1, 'web01', 'web01', ?)",
        [now()],
    )
    return db


def _point(db: Database, rp_id: int, boot: str | None = None) -> None:
    db.execute(
        "INSERT INTO restore_points (id, machine_id, snapshot_id, source_time, sealed_at, "
        "consistency, full, boot_verified) VALUES (?, 1, ?, ?, ?, 'crash', 1, ?)",
        [rp_id, f"snap{rp_id}", now(), now(), boot],
    )


def _plan(rp: str = "latest-verified") -> dict[str, object]:
    return {
        "format": 1,
        "name": "bv",
        "machines": [{"machine": "web01", "rank": 1, "restore_point": rp}],
    }


def test_checks_without_a_network() -> None:
    mp = MachinePlan(
        machine="web01",
        rank=1,
        checks=[
            Check(type="tcp", timeout_s=60, address="10.0.0.5", port=22),
            Check(type="agent", timeout_s=60),
            Check(type="delay", timeout_s=0, seconds=5),
            Check(type="console", timeout_s=60, pattern="login:"),
        ],
    )
    keep, skipped = bootverify.boot_checks(mp)
    assert [c.type for c in keep] == ["agent", "console"]
    assert skipped == ["tcp 10.0.0.5:22", "delay 5 s"]
    only_tcp = MachinePlan(
        machine="web01", rank=1, checks=[Check(type="tcp", timeout_s=9, address="1.2.3.4", port=1)]
    )
    keep, skipped = bootverify.boot_checks(only_tcp, bootverify.MIN_TIMEOUT_S["qemu"])
    assert [(c.type, c.pattern, c.timeout_s) for c in keep] == [
        ("console", r"FERRYMAN-BOOT-OK|login:", 900)  # TCG: a slow boot is not a failed one
    ]
    assert skipped == ["tcp 1.2.3.4:1"]


def test_latest_verified_needs_boot_verification(tmp_path: Path) -> None:
    db = _store(tmp_path / "s.db")
    _point(db, 1)
    problems = validate(_plan(), Inventory.from_db(db))
    assert [p.path for p in problems] == ["$.machines[0].restore_point"]
    assert "ferryman verify-boot web01" in problems[0].fix
    assert validate(_plan("latest"), Inventory.from_db(db)) == []
    bootverify.set_policy(db, "web01", "every-sync")
    assert validate(_plan(), Inventory.from_db(db)) == []
    bootverify.set_policy(db, "web01", "off")
    _point(db, 2, "bootable")
    assert validate(_plan(), Inventory.from_db(db)) == []


def test_policy_limits(tmp_path: Path) -> None:
    db = _store(tmp_path / "s.db")
    with pytest.raises(bootverify.BootVerifyError, match="use one of: off, every-sync"):
        bootverify.set_policy(db, "web01", "always")
    with pytest.raises(bootverify.BootVerifyError, match="too often"):
        bootverify.set_policy(db, "web01", "schedule", 60)
    m = bootverify.set_policy(db, "web01", "schedule")
    assert (m["boot_verify"], m["boot_verify_every_s"]) == ("schedule", bootverify.DEFAULT_EVERY_S)
    m = bootverify.set_policy(db, "web01", "every-sync")
    assert (m["boot_verify"], m["boot_verify_every_s"]) == ("every-sync", None)


def test_a_point_sealed_while_another_verification_runs_is_skipped(
    tmp_path: Path,
    fm_env: Env,  # paths of its own, should a job ever start
) -> None:
    path = tmp_path / "s.db"
    db = _store(path)
    _point(db, 1)
    _point(db, 2)
    bootverify.set_policy(db, "web01", "every-sync")
    # A verification of point 1 is running (the row a running job has).
    db.execute(
        "INSERT INTO jobs (id, kind, state, params, created_at) VALUES (7, 'bootverify', "
        "'running', ?, ?)",
        [dumps({"machine": 1, "restore_point": 1}), now()],
    )
    runner = JobRunner(lambda: open_store(path, migrate=False), all_specs())
    assert bootverify.tick(db, runner) == []
    report = db.execute("SELECT boot_report FROM restore_points WHERE id=2").fetchone()[0]
    assert "job 7 was still verifying point 1" in report
    msg = db.execute("SELECT message FROM events WHERE kind='bootverify'").fetchone()[0]
    assert msg.startswith("boot verification of restore point 2 of web01 skipped: job 7")
    assert "ferryman verify-boot web01 --point 2" in msg
    # Skipped once: the next tick leaves it alone, and no job was queued.
    assert bootverify.tick(db, runner) == []
    assert db.execute("SELECT count(*) FROM events WHERE kind='bootverify'").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1


def test_preconverted_point_fits_only_the_same_conversion(tmp_path: Path) -> None:
    db = _store(tmp_path / "s.db")
    _point(db, 1, "bootable")
    mp = MachinePlan(machine="web01", rank=1, hostname="web01")
    key = preconverted.custom_key("builtin", customisation(mp, []))
    assert key == preconverted.custom_key("builtin", {"hostname": "web01"})
    assert key != preconverted.custom_key("builtin", {"hostname": "web02"})
    assert key != preconverted.custom_key("virt-v2v", {"hostname": "web01"})
    f = tmp_path / "rp1-sda.qcow2"
    f.write_bytes(b"")
    chain = tmp_path / "chain"
    disks = [
        {"disk_key": "sda", "path": str(f), "chain": str(chain), "point": "rp1", "reader": "x"}
    ]
    preconverted.keep(
        db,
        1,
        1,
        disks,
        backend="builtin",
        key=key,
        plan="bv",
        convert_seconds=30.0,
        boot_seconds=40.0,
    )
    assert preconverted.usable(db, 1, 1, key) is not None
    assert preconverted.usable(db, 1, 1, preconverted.custom_key("builtin", None)) is None
    assert preconverted.usable(db, 1, 2, key) is None
    f.unlink()
    assert preconverted.usable(db, 1, 1, key) is None  # the file went: never boot a ghost


def test_a_verification_the_daemon_lost_is_reported_once(
    tmp_path: Path,
    fm_env: Env,  # paths of its own, should a job ever start
) -> None:
    path = tmp_path / "s.db"
    db = _store(path)
    _point(db, 1)
    bootverify.set_policy(db, "web01", "every-sync")
    db.execute(
        "INSERT INTO jobs (id, kind, state, params, created_at) VALUES (9, 'bootverify', "
        "'interrupted', '{}', ?)",
        [now()],
    )
    db.execute(
        "UPDATE restore_points SET boot_report=? WHERE id=1",
        [dumps({"state": "running", "job": 9})],
    )
    runner = JobRunner(lambda: open_store(path, migrate=False), all_specs())
    for _ in range(2):
        assert bootverify.tick(db, runner) == []
    report = db.execute("SELECT boot_report FROM restore_points WHERE id=1").fetchone()[0]
    assert json.loads(report) == {"job": 9, "state": "interrupted"}
    msgs = [r[0] for r in db.execute("SELECT message FROM events WHERE kind='bootverify'")]
    assert msgs == [
        "boot verification of restore point 1 of web01 was interrupted (job 9); run it "
        "again: ferryman verify-boot web01 --point 1"
    ]


def test_a_host_side_panic_is_not_the_guests_fault() -> None:
    from appliance.plans.readiness import CheckResult

    def failed(detail: str) -> list[CheckResult]:
        return [CheckResult("console /x/", "console", False, 30.0, detail)]

    tcg = (
        "the console shows: [    0.016000] Kernel panic - not syncing: IO-APIC + timer "
        "doesn't work!  Boot with apic=debug and send a report."
    )
    assert bootverify.host_failure(failed(tcg)) == tcg[:200]
    guest = "the console shows: [   21.1] Kernel panic - not syncing: Attempted to kill init!"
    assert bootverify.host_failure(failed(guest)) is None
    assert bootverify.host_failure([CheckResult("c", "console", True, 1.0, tcg)]) is None


def test_cutover_use_preconverted_needs_one_made_for_the_plan(tmp_path: Path, fm_env: Env) -> None:
    from appliance.plans.cutover import preconverted_checks
    from appliance.plans.model import parse

    db = _store(tmp_path / "s.db")
    _point(db, 1, "bootable")
    plan = parse({**_plan("latest"), "machines": [{"machine": "web01", "rank": 1}]})
    (check,) = preconverted_checks(db, plan)
    assert check["ok"] is False and check["detail"] == "none for this plan's conversion"
    assert check["fix"].startswith("ferryman verify-boot web01 --plan bv --wait")
    made_for = {"backend": "builtin", "plan": "bv", "convert_seconds": 1.0, "boot_seconds": 2.0}

    def disks(job: int) -> list[dict[str, str]]:
        f = preconverted.staging_path(1, 1, "sda", job)
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")
        return [
            {
                "disk_key": "sda",
                "path": str(f),
                "chain": str(tmp_path),
                "point": "rp1",
                "reader": "x",
            }
        ]

    other = preconverted.custom_key("builtin", {"hostname": "elsewhere"})
    preconverted.keep(db, 1, 1, disks(5), key=other, **made_for)  # another plan's host name
    assert preconverted_checks(db, plan)[0]["ok"] is False
    # Verified again for this plan: the earlier overlay is deleted, the new one kept.
    preconverted.keep(db, 1, 1, disks(6), key=preconverted.custom_key("builtin", None), **made_for)
    assert not preconverted.staging_path(1, 1, "sda", 5).exists()
    (check,) = preconverted_checks(db, plan)
    assert check["ok"] is True and check["detail"].startswith("point 1 (source time ")


def test_schedule_waits_for_its_interval_and_for_a_free_slot(
    tmp_path: Path,
    fm_env: Env,  # paths of its own, should a job ever start
) -> None:
    path = tmp_path / "s.db"
    db = _store(path)
    _point(db, 1, "bootable")
    db.execute(  # judged a minute ago
        "UPDATE restore_points SET boot_report='{}', boot_verified_at=? WHERE id=1", [now()]
    )
    _point(db, 2)
    bootverify.set_policy(db, "web01", "schedule", 7200)
    runner = JobRunner(lambda: open_store(path, migrate=False), all_specs())
    assert bootverify.tick(db, runner) == []  # the last verdict is younger than 2 h
    db.execute("UPDATE restore_points SET boot_verified_at='2020-01-01T00:00:00+00:00'")
    db.execute(
        "INSERT INTO jobs (id, kind, state, params, created_at) VALUES (3, 'bootverify', "
        "'running', ?, ?)",
        [dumps({"machine": 1, "restore_point": 1}), now()],
    )
    assert bootverify.tick(db, runner) == []  # due, but one verification at a time
    # "schedule" waits for the slot instead of skipping the point.
    assert db.execute("SELECT boot_report FROM restore_points WHERE id=2").fetchone()[0] is None
    assert db.execute("SELECT count(*) FROM events").fetchone()[0] == 0
