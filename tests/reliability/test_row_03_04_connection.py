"""Rows 3 and 4: the source connection drops (kill -9 nbdkit) or hangs (pause filter)."""

from __future__ import annotations

import threading
import time

import pytest

from appliance.datapath.copier import RetryPolicy
from appliance.datapath.errors import SourceUnavailable
from appliance.replication import sync_disks
from appliance.sources.nbd import NbdSource
from tests.datapath_fixtures import *  # noqa: F403
from tests.datapath_fixtures import (
    MiB,
    RecordingJournal,
    assert_ranges_equal,
    check_ok,
    hang_plugin,
    images_equal,
)

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(120)]

SIZE = 48 * MiB
IN_FLIGHT = 4


class Phases:
    def __init__(self) -> None:
        self.phases: list[str] = []
        self.done = 0

    def set_total(self, total: int) -> None:
        pass

    def update(self, n: int) -> None:
        self.done += n

    def set_phase(self, phase: str, **extra: object) -> None:
        self.phases.append(phase)


def _args(extra=()):
    return [
        "--filter=delay",
        *extra,
        "sparse-random",
        f"size={SIZE}",
        "percent=100",
        "seed=41",
        "delay-read=60ms",
    ]


def test_row_03_source_killed_and_restarted_reconnects(nbdkit_server, make_chain, dp_sock_dir):
    srv = nbdkit_server(*_args())
    chain = make_chain("vda")
    src = NbdSource({"disks": {"vda": srv.uri}, "snapshot_id": "s1"})

    def crash() -> None:
        time.sleep(0.7)
        srv.kill()  # SIGKILL
        time.sleep(1.0)
        srv.start()  # same export, same socket

    t = threading.Thread(target=crash)
    t.start()
    session = src.open_session(src.ref(), None)
    prog = Phases()
    res = sync_disks(
        session,
        {"vda": chain},
        point_name="p1",
        socket_dir=dp_sock_dir,
        progress=prog,
        max_in_flight=IN_FLIGHT,
        retry=RetryPolicy(retry_window=20, backoff_initial=0.1, backoff_max=0.5),
    )
    t.join()
    st = res[0].stats
    assert st.reconnects >= 1
    # Re-read bytes are counted and bounded by what was in flight at the crash.
    reread = st.bytes_read - SIZE
    assert 0 <= reread <= IN_FLIGHT * MiB
    assert "stalled" in prog.phases and prog.phases[-1] == "copying"
    p = chain.path_of("p1")
    assert images_equal(srv.uri, p, fb="qcow2").returncode == 0
    assert check_ok(p) in (0, 3)


def test_row_03_source_down_too_long_then_resume_from_journal(
    nbdkit_server, make_chain, dp_sock_dir
):
    srv = nbdkit_server(*_args())
    chain = make_chain("vda")
    src = NbdSource({"disks": {"vda": srv.uri}, "snapshot_id": "s1"})
    journal = RecordingJournal()
    threading.Timer(0.8, srv.kill).start()
    session = src.open_session(src.ref(), None)
    with pytest.raises(SourceUnavailable):
        sync_disks(
            session,
            {"vda": chain},
            point_name="p1",
            socket_dir=dp_sock_dir,
            journal=journal,
            max_in_flight=IN_FLIGHT,
            flush_interval=0.2,
            retry=RetryPolicy(
                retry_window=1.5, backoff_initial=0.1, backoff_max=0.3, connect_timeout=1
            ),
        )
    done = journal.ranges("vda")
    durable = sum(n for _, n in done)
    assert durable > 0 and chain.points() == []
    part = chain.partial()
    assert part is not None
    srv.start()
    assert assert_ranges_equal(part.path, srv.uri, done, dp_sock_dir) == durable
    session = src.open_session(src.ref(), None)
    res = sync_disks(
        session, {"vda": chain}, point_name="p1", socket_dir=dp_sock_dir, resume_from={"vda": done}
    )
    st = res[0].stats
    # Resume from the first undone extent: nothing durable is read again.
    assert st.bytes_skipped_resume == durable
    assert st.bytes_read == SIZE - durable
    p = chain.path_of("p1")
    assert images_equal(srv.uri, p, fb="qcow2").returncode == 0
    assert check_ok(p) in (0, 3)


def test_row_04_source_hangs_timeout_stalled_then_continues(
    nbdkit_server, make_chain, dp_dir, dp_sock_dir
):
    hang = dp_dir / "hang-now"
    plugin = hang_plugin(dp_dir)
    srv = nbdkit_server("python", str(plugin), f"size={SIZE}", f"hang-file={hang}")
    chain = make_chain("vda")
    src = NbdSource({"disks": {"vda": srv.uri}})
    prog = Phases()
    stalled_seen = threading.Event()

    def hang_source() -> None:
        while prog.done < 8 * MiB:
            time.sleep(0.02)
        hang.touch()  # every read blocks from now ...
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15 and "stalled" not in prog.phases:
            time.sleep(0.1)
        if "stalled" in prog.phases:
            stalled_seen.set()
        time.sleep(1.5)
        hang.unlink()  # ... until released

    t = threading.Thread(target=hang_source)
    t.start()
    session = src.open_session(src.ref(), None)
    res = sync_disks(
        session,
        {"vda": chain},
        point_name="p1",
        socket_dir=dp_sock_dir,
        progress=prog,
        max_in_flight=IN_FLIGHT,
        retry=RetryPolicy(
            request_timeout=1.0, retry_window=30, backoff_initial=0.1, connect_timeout=2
        ),
    )
    t.join()
    assert stalled_seen.is_set()  # the job showed "stalled" while the source hung
    assert res[0].stats.stalls >= 1 and res[0].stats.reconnects >= 1
    assert prog.phases[-1] == "copying"
    p = chain.path_of("p1")
    assert images_equal(srv.uri, p, fb="qcow2").returncode == 0
    assert check_ok(p) in (0, 3)
