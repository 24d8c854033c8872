"""Rows 12, 19, 20: the writer or the engine is killed mid-sync, and the resume state does
not match. Row 11 (the daemon killed many times in a loop) is test_row_11_engine_kill_loop."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time

import pytest

from appliance.datapath.errors import ResumeRefused, WriterError
from appliance.replication import sync_disks
from appliance.sources.nbd import NbdSource
from tests.datapath_fixtures import *  # noqa: F403
from tests.datapath_fixtures import (
    FileJournal,
    MiB,
    RecordingJournal,
    assert_ranges_equal,
    check_ok,
    images_equal,
    spawn_engine,
    writers_of,
)

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(400)]

SIZE = 48 * MiB


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _first_point(srv, chain, sock):
    src = NbdSource({"disks": {"vda": srv.uri}})
    s = src.open_session(src.ref(), None)
    sync_disks(s, {"vda": chain}, point_name="p1", socket_dir=sock)
    return s.token()


def test_row_12_writer_killed_earlier_points_untouched_partial_resumed(
    nbdkit_server, make_chain, dp_sock_dir
):
    base = nbdkit_server("sparse-random", f"size={SIZE}", "percent=60", "seed=121")
    chain = make_chain("vda")
    _first_point(base, chain, dp_sock_dir)
    p1 = chain.path_of("p1")
    p1_sha, p1_mtime = _sha(p1), p1.stat().st_mtime_ns
    base.kill()
    # The source moved on; copy it slowly so the writer can be killed mid-sync.
    srv = nbdkit_server(
        "--filter=delay",
        "sparse-random",
        f"size={SIZE}",
        "percent=100",
        "seed=122",
        "delay-read=40ms",
    )
    src = NbdSource({"disks": {"vda": srv.uri}, "snapshot_id": "snap-2"})
    journal = RecordingJournal()
    partial = chain.dir / "p2.qcow2.partial"

    def kill_writer() -> None:
        end = time.monotonic() + 20
        while time.monotonic() < end and sum(n for _, n in journal.ranges("vda")) < 8 * MiB:
            time.sleep(0.02)
        for pid in writers_of(partial):
            os.kill(pid, signal.SIGKILL)

    t = threading.Thread(target=kill_writer)
    t.start()
    with pytest.raises(WriterError):
        sync_disks(
            src.open_session(src.ref(), None),
            {"vda": chain},
            point_name="p2",
            socket_dir=dp_sock_dir,
            journal=journal,
            flush_interval=0.1,
            max_in_flight=4,
        )
    t.join()
    # Earlier restore point untouched: same bytes, same mtime, still read-only, check ok.
    assert _sha(p1) == p1_sha and p1.stat().st_mtime_ns == p1_mtime
    assert not (p1.stat().st_mode & 0o222) and check_ok(p1) in (0, 3)
    assert [p.name for p in chain.points()] == ["p1"]
    done = journal.ranges("vda")
    assert assert_ranges_equal(partial, srv.uri, done, dp_sock_dir) == sum(n for _, n in done)
    # Resumed with the same snapshot: only what is not durable is copied.
    res = sync_disks(
        src.open_session(src.ref(), None),
        {"vda": chain},
        point_name="p2",
        socket_dir=dp_sock_dir,
        resume_from={"vda": done},
    )
    assert res[0].resumed and res[0].stats.bytes_skipped_resume == sum(n for _, n in done)
    p2 = chain.path_of("p2")
    assert images_equal(srv.uri, p2, fb="qcow2").returncode == 0
    assert check_ok(p2) in (0, 3) and _sha(p1) == p1_sha


def test_row_19_engine_killed_during_delta(nbdkit_server, make_chain, dp_dir, dp_sock_dir):
    base = nbdkit_server("sparse-random", f"size={SIZE}", "percent=50", "seed=191")
    chain = make_chain("vda")
    tok = _first_point(base, chain, dp_sock_dir)
    p1 = chain.path_of("p1")
    p1_sha = _sha(p1)
    base.kill()
    srv = nbdkit_server(
        "--filter=delay",
        "sparse-random",
        f"size={SIZE}",
        "percent=50",
        "seed=192",
        "delay-read=150ms",
    )
    jpath = dp_dir / "journal-19"
    child = spawn_engine(
        {
            "uri": srv.uri,
            "chain": str(chain.dir),
            "point": "p2",
            "snapshot_id": "delta-1",
            "sock": str(dp_sock_dir),
            "journal": str(jpath),
            "token": tok,
            "opts": {"flush_interval": 0.1, "max_in_flight": 4},
        }
    )
    partial = chain.dir / "p2.qcow2.partial"
    end = time.monotonic() + 30
    while time.monotonic() < end and len(FileJournal(jpath).ranges()) < 1:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)  # kill -9 the engine during the delta
    child.wait()
    # The writer it started does not outlive it.
    end = time.monotonic() + 10
    while time.monotonic() < end and writers_of(partial):
        time.sleep(0.1)
    assert writers_of(partial) == []
    # The previous point is intact; the partial point is never listed.
    assert _sha(p1) == p1_sha and check_ok(p1) in (0, 3)
    assert [p.name for p in chain.points()] == ["p1"]
    assert chain.recover() == []  # nothing to clean: the partial is kept for a resume
    # A new source snapshot: the partial of delta-1 is discarded, never mixed.
    src = NbdSource({"disks": {"vda": srv.uri}, "snapshot_id": "delta-2"})
    res = sync_disks(
        src.open_session(src.ref(), tok),
        {"vda": chain},
        point_name="p2",
        socket_dir=dp_sock_dir,
        resume_from={"vda": FileJournal(jpath).ranges()},
    )
    assert not res[0].resumed and res[0].stats.bytes_skipped_resume == 0
    assert "journal entries ignored" in " ".join(res[0].notes)
    p2 = chain.path_of("p2")
    assert images_equal(srv.uri, p2, fb="qcow2").returncode == 0
    assert check_ok(p2) in (0, 3) and _sha(p1) == p1_sha


def test_row_20_resume_state_does_not_match(nbdkit_server, make_chain, dp_sock_dir):
    srv = nbdkit_server(
        "--filter=delay",
        "sparse-random",
        f"size={SIZE}",
        "percent=100",
        "seed=201",
        "delay-read=150ms",
    )
    chain = make_chain("vda")
    src = NbdSource({"disks": {"vda": srv.uri}, "snapshot_id": "snap-A"})
    journal = RecordingJournal()
    cancel = threading.Event()
    threading.Timer(0.8, cancel.set).start()
    with pytest.raises(Exception, match="cancelled"):
        sync_disks(
            src.open_session(src.ref(), None),
            {"vda": chain},
            point_name="p1",
            socket_dir=dp_sock_dir,
            journal=journal,
            cancel=cancel,
            flush_interval=0.1,
            max_in_flight=4,
        )
    done = journal.ranges("vda")
    assert done
    # Altered journal: another snapshot id -> refused with the reason.
    with pytest.raises(ResumeRefused, match="snap-A, not snap-B"):
        chain.resume("snap-B")
    # Another size -> the partial is not reused.
    meta = json.loads((chain.dir / "p1.partial.json").read_text())
    assert meta["snapshot_id"] == "snap-A"
    ov = chain.begin("p1", "snap-A", SIZE + MiB)
    assert not ov.resumed
    ov.discard()
    # A sync of snap-B with snap-A's journal: the journal is ignored, a full copy is made.
    src_b = NbdSource({"disks": {"vda": srv.uri}, "snapshot_id": "snap-B"})
    res = sync_disks(
        src_b.open_session(src_b.ref(), None),
        {"vda": chain},
        point_name="p1",
        socket_dir=dp_sock_dir,
        resume_from={"vda": done},
    )
    assert not res[0].resumed and res[0].stats.bytes_skipped_resume == 0
    assert res[0].point is not None and res[0].point.snapshot_id == "snap-B"
    p = chain.path_of("p1")
    assert images_equal(srv.uri, p, fb="qcow2").returncode == 0
    assert check_ok(p) in (0, 3)
