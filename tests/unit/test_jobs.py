"""Job runner on a real store: conflicts, cancel, progress, failures, recovery."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.daemon.jobs import JobContext, JobRunner, JobSpec, Progress
from appliance.errors import Conflict, FerrymanError, NotFound
from store.db import open_store


def wait_state(
    runner: JobRunner, job_id: int, states: tuple[str, ...], timeout: float = 10
) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        j = runner.get(job_id)
        if j["state"] in states:
            return j
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} stuck in {runner.get(job_id)['state']}")


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, threading.Event]:
    path = tmp_path / "s.db"
    db = open_store(path)
    db.execute(
        "INSERT INTO sources (name, kind, uri, created_at, updated_at) "
        "VALUES ('lab', 'nbd', 'nbd://x', 'now', 'now')"
    )
    for name in ("web01", "db01"):
        db.execute(
            "INSERT INTO machines (source_id, ref, name, discovered_at) VALUES (1, ?, ?, 'now')",
            [name, name],
        )
    return path, threading.Event()


def make_runner(path: Path, release: threading.Event) -> JobRunner:
    def copy_like(ctx: JobContext) -> dict[str, Any]:
        ctx.progress.set_total(100)
        while not release.wait(0.01):
            ctx.check_cancel()
        for _ in range(10):
            ctx.progress.update(10)
        return {"copied": ctx.progress.done}

    def broken(ctx: JobContext) -> None:
        raise FerrymanError("disk vda of web01 unreadable at offset 4096", hint="check source")

    def buggy(ctx: JobContext) -> None:
        raise ZeroDivisionError

    specs = [
        JobSpec("copy", copy_like, needs_machine=True, resumable=True),
        JobSpec("broken", broken),
        JobSpec("buggy", buggy),
        JobSpec("once", copy_like, singleton=True),
    ]
    return JobRunner(lambda: open_store(path, migrate=False), specs)


def test_job_runs_and_reports_result(setup: tuple[Path, threading.Event]) -> None:
    path, release = setup
    r = make_runner(path, release)
    j = r.submit("copy", machine_id=1, who="alice", origin="console")
    assert j["state"] in ("queued", "running")
    release.set()
    j = wait_state(r, j["id"], ("succeeded",))
    assert j["result"] == {"copied": 100}
    assert j["progress"]["done"] == 100 and j["requested_by"] == "alice"


@pytest.mark.row(27)
def test_second_job_on_same_machine_is_refused(setup: tuple[Path, threading.Event]) -> None:
    path, release = setup
    r = make_runner(path, release)
    first = r.submit("copy", machine_id=1)
    with pytest.raises(Conflict, match=f"already has job {first['id']}"):
        r.submit("copy", machine_id=1)
    other = r.submit("copy", machine_id=2)  # another machine is fine
    release.set()
    wait_state(r, first["id"], ("succeeded",))
    wait_state(r, other["id"], ("succeeded",))
    r.submit("copy", machine_id=1)  # free again
    assert r.wait_idle(10)


def test_singleton_kind(setup: tuple[Path, threading.Event]) -> None:
    path, release = setup
    r = make_runner(path, release)
    r.submit("once")
    with pytest.raises(Conflict, match="already running"):
        r.submit("once")
    release.set()
    assert r.wait_idle(10)


def test_cancel(setup: tuple[Path, threading.Event]) -> None:
    path, release = setup
    r = make_runner(path, release)
    j = r.submit("copy", machine_id=1)
    wait_state(r, j["id"], ("running",))
    r.cancel(j["id"])
    j = wait_state(r, j["id"], ("cancelled",))
    assert "cancelled" in j["error"]
    with pytest.raises(Conflict, match="already cancelled"):
        r.cancel(j["id"])


def test_failures_are_recorded_with_their_message(setup: tuple[Path, threading.Event]) -> None:
    path, release = setup
    r = make_runner(path, release)
    j = wait_state(r, r.submit("broken")["id"], ("failed",))
    assert j["error"] == "disk vda of web01 unreadable at offset 4096 (check source)"
    j = wait_state(r, r.submit("buggy")["id"], ("failed",))
    assert j["error"].startswith("internal error: ZeroDivisionError")
    with pytest.raises(NotFound, match="unknown job kind"):
        r.submit("nope")
    with pytest.raises(FerrymanError, match="needs a machine"):
        r.submit("copy")


def test_recover_resumes_resumable_and_interrupts_others(
    setup: tuple[Path, threading.Event],
) -> None:
    path, release = setup
    db = open_store(path)
    # What a killed daemon leaves behind: rows still 'running'.
    for kind, mid in (("copy", 1), ("broken", None)):
        db.execute(
            "INSERT INTO jobs (kind, machine_id, state, created_at, daemon_pid, attempts)"
            " VALUES (?, ?, 'running', 'now', 4242, 1)",
            [kind, mid],
        )
    release.set()
    r = make_runner(path, release)
    actions = {a["id"]: a["action"] for a in r.recover()}
    assert actions == {1: "resumed", 2: "interrupted"}
    assert wait_state(r, 1, ("succeeded",))["attempts"] == 2
    j = r.get(2)
    assert j["state"] == "interrupted" and "pid 4242" in j["error"]


def test_resume_gives_up_after_repeated_crashes(setup: tuple[Path, threading.Event]) -> None:
    path, release = setup
    db = open_store(path)
    db.execute(
        "INSERT INTO jobs (kind, machine_id, state, created_at, attempts) "
        "VALUES ('copy', 1, 'running', 'now', 3)"
    )
    r = make_runner(path, release)
    assert r.recover() == [{"id": 1, "action": "interrupted"}]
    assert "interrupted 3 times" in r.get(1)["error"]


def test_progress_rate_and_eta() -> None:
    t = [0.0]
    p = Progress(clock=lambda: t[0])
    p.set_total(1000)
    for _ in range(5):
        t[0] += 1.0
        p.update(100)
    s = p.snapshot()
    assert s["done"] == 500 and s["rate"] == pytest.approx(100.0)
    assert s["eta_s"] == pytest.approx(5.0)
