"""Row 20: the resume state does not match. ferrymand is killed mid-sync; the journal is then
altered to name another source snapshot. On restart the sync must refuse to resume it (with
the reason), discard the partial overlay and copy again from the last restore point: data of
two snapshots is never mixed."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from appliance.units import MiB
from tests.helpers.daemon import Daemon, Env, running_daemon
from tests.helpers.nbdsrc import Export, assert_equal, cli, point_path, register, source

_ = source
pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]


def test_row_20_resume_against_other_snapshot_restarts(fm_env: Env, source: Export) -> None:
    d = Daemon(fm_env, "--no-probe")
    d.wait_ready()
    try:
        register(fm_env, source, "--param", "snapshot_id=export-v1")
        cli(fm_env, "set", "web01", "--throttle", "512KiB")
        job = cli(fm_env, "sync", "web01")
        end = time.monotonic() + 60
        while time.monotonic() < end:
            con = sqlite3.connect(fm_env.db)
            done = con.execute("SELECT coalesce(sum(length),0) FROM sync_extents").fetchone()[0]
            con.close()
            if done >= MiB:
                break
            time.sleep(0.2)
        d.kill9()
    finally:
        d.stop()  # only if an assertion failed before the kill
    con = sqlite3.connect(fm_env.db)
    con.execute("UPDATE sync_sessions SET snapshot_id='export-v0-tampered'")
    con.commit()
    con.close()
    partials = list(Path(fm_env.vars()["FERRYMAN_VOLUME_DIR"]).rglob("*.partial"))
    assert partials, "the killed sync should have left its partial overlay"
    with running_daemon(fm_env, "--no-probe"):
        cli(fm_env, "set", "web01", "--no-throttle")
        j = cli(fm_env, "job", "show", str(job["id"]), "--wait")
        assert j["state"] == "succeeded", j
        assert j["result"]["resumed"] is False and j["result"]["bytes_skipped_resume"] == 0
        ev = [e["message"] for e in cli(fm_env, "events", "--limit", "100")]
        assert any("cannot resume" in e and "export-v0-tampered" in e for e in ev), ev
        p, _ = point_path(fm_env, "web01")
        assert_equal(source.img, p)
    con = sqlite3.connect(fm_env.db)
    states = [r[0] for r in con.execute("SELECT state FROM sync_sessions ORDER BY id")]
    assert states == ["abandoned", "sealed"]
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert not list(Path(fm_env.vars()["FERRYMAN_VOLUME_DIR"]).rglob("*.partial"))
