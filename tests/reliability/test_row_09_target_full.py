"""Row 9: the volume store fills up during a sync (a small tmpfs as the target)."""

from __future__ import annotations

import subprocess

import pytest

from appliance.datapath.chain import DiskChain
from appliance.datapath.errors import TargetFull
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


@pytest.fixture
def small_fs(dp_dir):
    mnt = dp_dir / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here: {r.stderr}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_row_09_disk_full_clear_error_no_point_then_resume(nbdkit_server, small_fs, dp_sock_dir):
    srv = nbdkit_server("sparse-random", f"size={SIZE}", "percent=100", "seed=91")
    chain = DiskChain(small_fs / "m1" / "vda")
    journal = RecordingJournal()
    src = NbdSource({"disks": {"vda": srv.uri}, "snapshot_id": "snap-9"})
    session = src.open_session(src.ref(), None)
    with pytest.raises(TargetFull) as ei:
        sync_disks(
            session,
            {"vda": chain},
            point_name="p1",
            socket_dir=dp_sock_dir,
            journal=journal,
            flush_every=4 * MiB,
        )
    assert "is full" in str(ei.value) and "disk vda" in str(ei.value)
    # No half restore point visible; what the journal claims is on the target.
    assert chain.points() == []
    part = chain.partial()
    assert part is not None
    done = journal.ranges("vda")
    assert 0 < sum(n for _, n in done) < SIZE
    assert assert_ranges_equal(part.path, srv.uri, done, dp_sock_dir) == sum(n for _, n in done)
    # Space is freed (the store grows); the sync resumes from the journal.
    subprocess.run(["mount", "-o", "remount,size=200m", str(small_fs)], check=True)
    session = src.open_session(src.ref(), None)
    res = sync_disks(
        session, {"vda": chain}, point_name="p1", socket_dir=dp_sock_dir, resume_from={"vda": done}
    )
    assert res[0].resumed and res[0].stats.bytes_skipped_resume == sum(n for _, n in done)
    p = chain.path_of("p1")
    assert images_equal(srv.uri, p, fb="qcow2").returncode == 0
    assert check_ok(p) in (0, 3)
