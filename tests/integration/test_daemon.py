"""ferrymand as a real subprocess on a temporary store and socket."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sqlite3
import time

import pytest

from appliance.errors import Conflict
from store.migrations import migrations
from tests.helpers.daemon import Daemon, Env, run_cli, running_daemon

pytestmark = pytest.mark.integration


def children_of(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    return out


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its new parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_api_through_client_and_cli(daemon: Daemon, fm_env: Env) -> None:
    with fm_env.client() as c:
        h = c.health()
        newest = migrations._migrations[-1].name  # every migration applied at start
        assert h["pid"] == daemon.proc.pid and h["schema"] == newest
        assert c.jobs() == []
        assert "/v1/jobs" in c.openapi()["paths"]
    r = run_cli(fm_env, "status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["health"]["pid"] == daemon.proc.pid
    assert (fm_env.socket.stat().st_mode & 0o777) == 0o660


@pytest.mark.row(27)
def test_kill9_during_job_then_restart_reports_interrupted(fm_env: Env) -> None:
    d = Daemon(fm_env, "--no-probe")
    d.wait_ready()
    try:
        with fm_env.client() as c:
            job = c.submit("probe")  # boots the host kernel under KVM then TCG: ~30 s
            end = time.monotonic() + 20
            while c.job(job["id"])["state"] != "running" and time.monotonic() < end:
                time.sleep(0.1)
            with pytest.raises(Conflict, match="already running"):
                c.submit("probe")  # a second operator gets a refusal, not a race
        time.sleep(1.0)
        kids = children_of(d.proc.pid)
        assert kids, "the probe should be running qemu"
        d.kill9()
    finally:
        d.stop()  # only if an assertion failed before the kill
    end = time.monotonic() + 5
    while any(alive(k) for k in kids) and time.monotonic() < end:
        time.sleep(0.1)
    assert [k for k in kids if alive(k)] == [], "qemu outlived ferrymand"
    with running_daemon(fm_env, "--no-probe"), fm_env.client() as c:
        j = c.job(job["id"])
        assert j["state"] == "interrupted"
        assert f"pid {d.proc.pid}" in j["error"]
        msgs = [e["message"] for e in c.events()]
        assert any(f"job {job['id']} (probe) interrupted" in m for m in msgs)
    con = sqlite3.connect(fm_env.db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_second_daemon_refused(daemon: Daemon, fm_env: Env) -> None:
    second = Daemon(fm_env, "--no-probe")
    assert second.proc.wait(30) == 2
    err = second.proc.stderr.read().strip().splitlines()  # type: ignore[union-attr]
    assert len(err) == 1 and f"another ferrymand (pid {daemon.proc.pid})" in err[0]
    with fm_env.client() as c:
        assert c.health()["pid"] == daemon.proc.pid  # the first one is unharmed


def test_socket_in_use_refused_nothing_written(fm_env: Env) -> None:
    fm_env.socket.parent.mkdir(parents=True)
    squatter = socket.socket(socket.AF_UNIX)
    squatter.bind(str(fm_env.socket))
    squatter.listen(1)
    try:
        d = Daemon(fm_env, "--no-probe")
        assert d.proc.wait(30) == 2
        err = d.proc.stderr.read().strip().splitlines()  # type: ignore[union-attr]
        assert len(err) == 1 and "already in use" in err[0]
    finally:
        squatter.close()


def test_stale_socket_is_replaced(fm_env: Env) -> None:
    fm_env.socket.parent.mkdir(parents=True)
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(fm_env.socket))
    s.close()  # a dead daemon's socket file
    with running_daemon(fm_env, "--no-probe"), fm_env.client() as c:
        assert c.health()["version"]


def test_newer_schema_refused_nothing_changed(fm_env: Env) -> None:
    with running_daemon(fm_env, "--no-probe"):
        pass
    con = sqlite3.connect(fm_env.db)
    con.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
        "VALUES ('ferryman', 'm900_future', 'x')"
    )
    con.commit()
    con.close()
    before = hashlib.sha256(fm_env.db.read_bytes()).hexdigest()
    d = Daemon(fm_env, "--no-probe")
    assert d.proc.wait(30) == 2
    err = d.proc.stderr.read().strip().splitlines()  # type: ignore[union-attr]
    assert len(err) == 1 and "newer version" in err[0] and "m900_future" in err[0]
    assert hashlib.sha256(fm_env.db.read_bytes()).hexdigest() == before


def test_unusable_store_dir_refused(fm_env: Env) -> None:
    fm_env.root.joinpath("state").write_text("not a directory")
    d = Daemon(fm_env, "--no-probe")
    assert d.proc.wait(30) == 2
    err = d.proc.stderr.read().strip().splitlines()  # type: ignore[union-attr]
    assert len(err) == 1 and "cannot create the store directory" in err[0]
    assert fm_env.root.joinpath("state").read_text() == "not a directory"


def test_store_backup_while_running(daemon: Daemon, fm_env: Env) -> None:
    dest = fm_env.root / "backup.db"
    r = run_cli(fm_env, "store", "backup", str(dest), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["file"] == str(dest)
    con = sqlite3.connect(dest)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] >= 1
    r = run_cli(fm_env, "store", "backup", str(dest))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "already exists" in r.stderr
