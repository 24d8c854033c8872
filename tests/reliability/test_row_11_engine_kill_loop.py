"""Row 11: the engine is killed mid-extent, at random times, many times in a loop.

A real ferrymand syncs a real NBD export (nbdkit serving a raw file, with the stats filter
counting every byte read). The daemon is SIGKILLed at a random moment of the copy, again and
again; after every kill each extent the journal (``sync_extents``) marks done must already
be in the partial overlay on disk, equal to the source. The daemon is restarted each time:
the job resumes (or, once it was interrupted too often, a new sync picks the same session
up). At the end the restore point equals the source block for block, qemu-img check and
PRAGMA integrity_check pass, and the bytes read from the source stay bounded: what the
journal had not yet recorded is all a kill may cost.
"""

from __future__ import annotations

import random
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from appliance.datapath import extents as ex
from appliance.datapath.copier import connect
from appliance.datapath.writer import QemuNbd
from appliance.units import MiB
from tests.datapath_fixtures import *  # noqa: F403
from tests.datapath_fixtures import NbdkitServer, write_chunks, writers_of
from tests.helpers.daemon import Daemon, Env
from tests.helpers.nbdsrc import assert_equal, cli

pytestmark = [pytest.mark.reliability, pytest.mark.row(11), pytest.mark.timeout(900)]

SIZE = 128 * MiB
CHUNKS = [
    (0, 24 * MiB, 1),
    (32 * MiB, 40 * MiB, 2),
    (80 * MiB, 16 * MiB, 3),
    (104 * MiB, 16 * MiB, 4),
]
DATA = sum(n for _, n, _ in CHUNKS)
RATE = 2 * MiB  # throttled: ten short runs cannot finish the copy
FLUSH_S = 0.5  # FERRYMAN_FLUSH_INTERVAL_S: the journal lags the copy by at most this
KILLS = 10
PER_KILL_BOUND = 4 * MiB  # re-read allowed per kill: unflushed data + requests in flight


def _db(env: Env) -> sqlite3.Connection:
    return sqlite3.connect(env.db, timeout=30)


def _journal(env: Env) -> tuple[int | None, list[tuple[int, int]]]:
    con = _db(env)
    try:
        row = con.execute(
            "SELECT id FROM sync_sessions WHERE state='copying' ORDER BY id DESC LIMIT 1"
        ).fetchone()
        if row is None:
            return None, []
        rows = con.execute(
            "SELECT offset, length FROM sync_extents WHERE session_id=?",
            [row[0]],
        ).fetchall()
        return int(row[0]), [(int(o), int(n)) for o, n in rows]
    finally:
        con.close()


def _journal_on_disk(partial: Path, img: Path, done: list[tuple[int, int]], sock: Path) -> int:
    """Each journaled range reads the same from the partial overlay and the source FILE (not
    the nbdkit export: its byte counter must count only the engine's reads)."""
    total = 0
    with QemuNbd(partial, sock, read_only=True) as rd, open(img, "rb") as f:
        h = connect(rd.uri, timeout=60)
        for off, n in ex.coalesce_ranges(done):
            pos = off
            while pos < off + n:
                k = min(MiB, off + n - pos)
                f.seek(pos)
                assert h.pread(k, pos) == f.read(k), f"journaled range at {pos} is not on disk"
                pos += k
                total += k
    return total


def _bytes_read(statsfile: Path) -> float:
    """Bytes the nbdkit stats filter counted as read (all runs of the export)."""
    unit = {"bytes": 1, "KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB}
    total = 0.0
    for m in re.finditer(r"^read: \d+ ops, [\d.]+ s, ([\d.]+) (\w+)", statsfile.read_text(), re.M):
        total += float(m.group(1)) * unit[m.group(2)]
    return total


def _copying(env: Env, timeout: float = 120) -> None:
    vols = Path(env.vars()["FERRYMAN_VOLUME_DIR"])
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if any(writers_of(p) for p in vols.rglob("*.qcow2.partial")):
            return
        time.sleep(0.05)
    pytest.fail(f"no writer started within {timeout} s: {env.log.read_text()[-1500:]}")


def _active_sync(env: Env) -> int | None:
    """The sync job still queued or running, from the store (the CLI is slow on a loaded
    machine: its start-up would shift every kill)."""
    con = _db(env)
    try:
        row = con.execute(
            "SELECT id FROM jobs WHERE kind='sync' AND state IN ('queued','running') "
            "ORDER BY id DESC LIMIT 1"
        ).fetchone()
        return int(row[0]) if row else None
    finally:
        con.close()


def test_row_11_daemon_killed_at_random_times_in_a_loop(
    fm_env: Env, dp_dir: Path, dp_sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRYMAN_FLUSH_INTERVAL_S", str(FLUSH_S))
    img = dp_dir / "source.raw"
    subprocess.run(["truncate", "-s", str(SIZE), str(img)], check=True)
    write_chunks(img, CHUNKS)
    stats = dp_dir / "stats.txt"
    srv = NbdkitServer(
        dp_sock_dir,
        ["--filter=stats", "file", str(img), f"statsfile={stats}", "statsappend=true"],
        "row11",
    ).start()
    d = Daemon(fm_env, "--no-probe")
    try:
        d.wait_ready()
        src = ["--uri", srv.uri, "--param", "name=web01", "--param", "snapshot_id=export-v1"]
        cli(fm_env, "source", "add", "lab", "--kind", "nbd", *src)
        assert cli(fm_env, "discover", "lab", "--wait")["result"]["machines"] == 1
        cli(fm_env, "protect", "web01")
        cli(fm_env, "set", "web01", "--throttle", f"{RATE // MiB}MiB")
        first = cli(fm_env, "sync", "web01")
        rnd = random.Random(1111)
        kills, checked, new_jobs, last_done = 0, 0, 0, 0
        sid = None
        while kills < KILLS:
            job = _active_sync(fm_env)
            if job is None:  # interrupted too often: not resumed again; start it by hand
                job = cli(fm_env, "sync", "web01")["id"]
                new_jobs += 1
            _copying(fm_env)  # this daemon's copy is under way (its writer serves the overlay)
            time.sleep(rnd.uniform(0.1, 2.5))
            d.kill9()
            kills += 1
            assert _active_sync(fm_env) == job, f"job {job} finished before kill {kills}"
            sid, done = _journal(fm_env)
            assert sid is not None, "the sync session is no longer 'copying' after a kill"
            partials = list(Path(fm_env.vars()["FERRYMAN_VOLUME_DIR"]).rglob("*.qcow2.partial"))
            if not partials:  # killed before the overlay existed: nothing may be journaled
                assert done == [], done
            else:
                end = time.monotonic() + 30  # the killed daemon's writer flushes and goes
                while time.monotonic() < end and writers_of(partials[0]):
                    time.sleep(0.05)
                assert writers_of(partials[0]) == [], "a writer outlived the killed daemon"
                covered = _journal_on_disk(partials[0], img, done, dp_sock_dir)
                assert covered == sum(n for _, n in ex.coalesce_ranges(done))
                assert covered >= last_done, "the journal lost extents across a kill"
                last_done, checked = covered, checked + 1
            print(f"kill {kills}: job {job}, {last_done / MiB:.1f} MiB journaled and on disk")
            d = Daemon(fm_env, "--no-probe")
            d.wait_ready()
        cli(fm_env, "set", "web01", "--no-throttle")
        job = _active_sync(fm_env) or cli(fm_env, "sync", "web01")["id"]
        j = cli(fm_env, "job", "show", str(job), "--wait")
        assert j["state"] == "succeeded", j
        res = j["result"]
        assert res["resumed"] is True and res["bytes_skipped_resume"] >= last_done > 0
        p = Path(cli(fm_env, "points", "web01")[-1]["disks"][0]["path"])
        assert_equal(img, p)
        events = [e["message"] for e in cli(fm_env, "events", "--limit", "200")]
    finally:
        d.stop()  # the daemon of this round (a killed one: nothing to do)
        srv.stop()  # SIGTERM: the stats filter writes its counts on exit
    con = _db(fm_env)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    states = [r[0] for r in con.execute("SELECT state FROM sync_sessions ORDER BY id")]
    assert states == ["sealed"], states  # one session, resumed every time, never restarted
    assert con.execute("SELECT count(*) FROM restore_points").fetchone()[0] == 1
    assert con.execute("SELECT count(*) FROM sync_extents").fetchone()[0] == 0
    con.close()
    read = _bytes_read(stats)
    print(
        f"row 11: {kills} kills, {new_jobs} syncs restarted by hand, first job {first['id']}, "
        f"data {DATA / MiB:.0f} MiB, read {read / MiB:.1f} MiB, "
        f"re-read {(read - DATA) / MiB:.1f} MiB ({(read - DATA) / kills / MiB:.2f} MiB/kill)"
    )
    assert checked >= KILLS // 2 and sid is not None
    assert any("resum" in e for e in events), events[:20]
    assert DATA <= read <= DATA + KILLS * PER_KILL_BOUND, (read, DATA)
