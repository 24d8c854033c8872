"""Rows 1 and 2: transient and permanent source read errors (nbdkit error filter)."""

from __future__ import annotations

import threading
import time

import pytest

from appliance.datapath import extents as ex
from appliance.datapath.copier import RetryPolicy
from appliance.datapath.errors import SourceReadError
from appliance.replication import sync_disks
from appliance.sources.nbd import NbdSource
from tests.datapath_fixtures import *  # noqa: F403
from tests.datapath_fixtures import (
    MiB,
    RecordingJournal,
    assert_ranges_equal,
    check_ok,
    images_equal,
)

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(120)]

SIZE = 48 * MiB


def _server(nbdkit_server, errfile):
    return nbdkit_server(
        "--filter=error",
        "--filter=delay",
        "sparse-random",
        f"size={SIZE}",
        "percent=100",
        "seed=31",
        "delay-read=60ms",
        "error-pread-rate=100%",
        f"error-file={errfile}",
    )


def test_row_01_transient_read_errors_are_retried(nbdkit_server, make_chain, dp_dir, dp_sock_dir):
    errfile = dp_dir / "fail-now"
    srv = _server(nbdkit_server, errfile)
    chain = make_chain("vda")
    journal = RecordingJournal()
    src = NbdSource({"disks": {"vda": srv.uri}})

    def inject() -> None:
        time.sleep(0.4)
        errfile.touch()  # every read fails from now ...
        time.sleep(1.2)
        errfile.unlink()  # ... until here

    t = threading.Thread(target=inject)
    t.start()
    session = src.open_session(src.ref(), None)
    res = sync_disks(
        session,
        {"vda": chain},
        point_name="p1",
        socket_dir=dp_sock_dir,
        journal=journal,
        max_in_flight=4,
        flush_interval=0.2,
        retry=RetryPolicy(retry_window=30, backoff_initial=0.1, backoff_max=0.5),
    )
    t.join()
    st = res[0].stats
    assert st.retries > 0
    # Every byte journaled once the covering flush was done, and all of it is right.
    assert ex.coalesce_ranges(journal.ranges("vda")) == [(0, SIZE)]
    p = chain.path_of("p1")
    assert images_equal(srv.uri, p, fb="qcow2").returncode == 0
    assert check_ok(p) in (0, 3)


def test_row_02_permanent_read_error_names_disk_offset_errno(
    nbdkit_server, make_chain, dp_dir, dp_sock_dir
):
    errfile = dp_dir / "fail-now"
    srv = _server(nbdkit_server, errfile)
    chain = make_chain("vda")
    journal = RecordingJournal()
    src = NbdSource({"disks": {"vda": srv.uri}, "snapshot_id": "lvm-snap-1"})
    threading.Timer(0.6, errfile.touch).start()
    session = src.open_session(src.ref(), None)
    with pytest.raises(SourceReadError) as ei:
        sync_disks(
            session,
            {"vda": chain},
            point_name="p1",
            socket_dir=dp_sock_dir,
            journal=journal,
            max_in_flight=4,
            flush_interval=0.2,
            retry=RetryPolicy(retry_window=1.5, backoff_initial=0.1, backoff_max=0.3),
        )
    e = ei.value
    assert e.disk == "vda" and e.errno == 5 and e.offset % MiB == 0
    assert "disk vda" in str(e) and f"offset {e.offset}" in str(e) and "EIO" in str(e)
    # No restore point published; the journal is kept and every journaled byte is durable
    # in the partial overlay.
    assert chain.points() == []
    part = chain.partial()
    assert part is not None
    done = journal.ranges("vda")
    assert done and all(o + n <= e.offset or o >= e.offset + MiB for o, n in done)
    # The operator fixes the storage ...
    errfile.unlink()
    assert assert_ranges_equal(part.path, srv.uri, done, dp_sock_dir) > 0
    # ... and the sync resumes from the journal.
    session = src.open_session(src.ref(), None)
    res = sync_disks(
        session, {"vda": chain}, point_name="p1", socket_dir=dp_sock_dir, resume_from={"vda": done}
    )
    st = res[0].stats
    assert res[0].resumed and st.bytes_skipped_resume == sum(n for _, n in ex.coalesce_ranges(done))
    assert st.bytes_read == SIZE - st.bytes_skipped_resume
    p = chain.path_of("p1")
    assert images_equal(srv.uri, p, fb="qcow2").returncode == 0
    assert check_ok(p) in (0, 3)
