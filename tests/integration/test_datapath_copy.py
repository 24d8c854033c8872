"""Copier + writer + chain against real nbdkit and qemu-nbd exports.

Every test ends with the proof: the restore point equals the source (qemu-img compare or
block hashes) and qemu-img check passes.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest

from appliance.datapath import extents as ex
from appliance.datapath.chain import DiskChain
from appliance.datapath.copier import Copier, connect
from appliance.datapath.hashing import hash_export, verify
from appliance.datapath.throttle import Throttle
from appliance.replication import copy_disk, seal_disk, sync_disks
from appliance.sources.nbd import NbdSource
from tests.datapath_fixtures import *  # noqa: F403
from tests.datapath_fixtures import MiB, RecordingJournal, check_ok, images_equal, write_chunks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class Prog:
    def __init__(self) -> None:
        self.total = 0
        self.done = 0
        self.phases: list[str] = []

    def set_total(self, total: int) -> None:
        self.total = total

    def update(self, n: int) -> None:
        self.done += n

    def set_phase(self, phase: str, **extra: object) -> None:
        self.phases.append(phase)


def _sync_nbd(
    src: NbdSource, chain: DiskChain, name: str, sock: Path, prev: dict | None, **kw: object
) -> tuple[dict, list]:
    session = src.open_session(src.ref(), prev)
    res = sync_disks(session, {"vda": chain}, point_name=name, socket_dir=sock, **kw)
    token = session.token()
    session.release()
    return token, res


def test_full_copy_sparse_random_into_base(
    nbdkit_server, make_chain, dp_sock_dir, recording_journal
):
    # 256 MiB, ~25 % data in random places: block status must elide the rest.
    srv = nbdkit_server("sparse-random", "size=256M", "percent=25", "seed=7", "runlength=4194304")
    chain = make_chain("vda")
    src = NbdSource({"disks": {"vda": srv.uri}, "name": "m1"})
    prog = Prog()
    _, res = _sync_nbd(
        src, chain, "p1", dp_sock_dir, None, journal=recording_journal, progress=prog
    )
    st = res[0].stats
    p = chain.path_of("p1")
    assert images_equal(srv.uri, p, fb="qcow2").returncode == 0
    assert check_ok(p) in (0, 3)
    # Zero elision: we read only the 1 MiB hash blocks that hold data (the NBD source builds
    # a manifest for later compare-mode syncs), well under half of the disk.
    h = connect(srv.uri, contexts=[ex.BASE_ALLOCATION])
    exts, _ = ex.query_extents(h, h.get_size())
    del h
    snapped = ex.snap_to_blocks(exts, MiB, 256 * MiB)
    assert st.bytes_read == sum(e.length for e in snapped if not e.zero) < 0.5 * 256 * MiB
    assert st.bytes_read + st.bytes_zeroed == 256 * MiB
    assert prog.done == prog.total == 256 * MiB
    # The journal covers the whole disk after the final flush, and nothing else.
    assert ex.coalesce_ranges(recording_journal.ranges("vda")) == [(0, 256 * MiB)]
    # Sealed: read-only on disk, listed in chain.json, no partial left.
    assert not (p.stat().st_mode & 0o222)
    assert json.loads(chain.manifest.read_text())["points"][0]["name"] == "p1"
    assert not list(chain.dir.glob("*.partial*"))


def test_incremental_from_qemu_dirty_bitmap(make_image, qemu_nbd_server, make_chain, dp_sock_dir):
    size = 64 * MiB
    img = make_image("src.qcow2", size, [(0, 8 * MiB, 1), (32 * MiB, 4 * MiB, 2)], fmt="qcow2")
    chain = make_chain("vda")
    q = qemu_nbd_server(img, read_only=True)
    src = NbdSource({"disks": {"vda": q.uri}})
    tok1, r1 = _sync_nbd(src, chain, "p1", dp_sock_dir, None)
    q.stop()
    assert r1[0].mode == "full"
    assert images_equal(img, chain.path_of("p1"), "qcow2", "qcow2").returncode == 0
    # The operator's bitmap starts at the point of the first sync; then the guest writes
    # 1 MiB of new data, overwrites 512 KiB with zeroes and 256 KiB with other data.
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    write_chunks(img, [(40 * MiB, 1 * MiB, 3), (2 * MiB, 256 * 1024, 4)], fmt="qcow2")
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -z {4 * MiB} {512 * 1024}", str(img)],
        check=True,
        capture_output=True,
    )
    q2 = qemu_nbd_server(img, read_only=True, bitmap="b0")
    src2 = NbdSource({"disks": {"vda": q2.uri}, "bitmap": "b0"})
    _, r2 = _sync_nbd(src2, chain, "p2", dp_sock_dir, tok1)
    q2.stop()
    st = r2[0].stats
    assert r2[0].mode == "dirty"
    changed = 1 * MiB + 256 * 1024
    assert st.bytes_read == changed  # read amplification 1.0: only the dirty data
    assert st.bytes_zeroed == 512 * 1024  # the zeroed range went as a zero request
    assert st.bytes_written == changed
    p2 = chain.path_of("p2")
    assert images_equal(img, p2, "qcow2", "qcow2").returncode == 0
    assert check_ok(p2) in (0, 3)
    # p1 untouched: still equals its own state (the 4 MiB range at 4 MiB still data).
    assert (
        subprocess.run(
            [
                "qemu-img",
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                str(chain.path_of("p1")),
                str(p2),
            ],
            capture_output=True,
        ).returncode
        == 1
    )


def test_compare_mode_writes_only_changed_blocks(
    make_image, qemu_nbd_server, make_chain, dp_sock_dir
):
    size = 32 * MiB
    img = make_image("src.raw", size, [(0, 16 * MiB, 11)])
    chain = make_chain("vda")
    q = qemu_nbd_server(img, read_only=True, fmt="raw")
    src = NbdSource({"disks": {"vda": q.uri}})
    tok1, r1 = _sync_nbd(src, chain, "p1", dp_sock_dir, None, verify_after=True)
    assert r1[0].verify and r1[0].verify["ok"]
    q.stop()
    write_chunks(img, [(3 * MiB + 100, 1000, 12), (20 * MiB, 1 * MiB, 13)])
    q = qemu_nbd_server(img, read_only=True, fmt="raw")
    src = NbdSource({"disks": {"vda": q.uri}})
    _, r2 = _sync_nbd(src, chain, "p2", dp_sock_dir, tok1, verify_after=True)
    st = r2[0].stats
    assert r2[0].mode == "compare"
    assert st.bytes_written == 2 * MiB  # two 1 MiB hash blocks changed
    assert st.bytes_unchanged == 15 * MiB
    assert r2[0].verify and r2[0].verify["ok"]
    assert images_equal(img, chain.path_of("p2"), "raw", "qcow2").returncode == 0
    assert check_ok(chain.path_of("p2")) in (0, 3)


def test_zero_extents_over_data_become_zero_requests(
    make_image, qemu_nbd_server, make_chain, dp_sock_dir
):
    """Full copy into an overlay whose parent has data where the source now has zeroes."""
    size = 16 * MiB
    img = make_image("src.raw", size, [(0, size, 21)])
    chain = make_chain("vda")
    q = qemu_nbd_server(img, read_only=True, fmt="raw")
    _sync_nbd(NbdSource({"disks": {"vda": q.uri}}), chain, "p1", dp_sock_dir, None)
    q.stop()
    subprocess.run(["truncate", "-s", "0", str(img)], check=True)
    subprocess.run(["truncate", "-s", str(size), str(img)], check=True)
    write_chunks(img, [(8 * MiB, 1 * MiB, 22)])
    q = qemu_nbd_server(img, read_only=True, fmt="raw")
    _, r2 = _sync_nbd(NbdSource({"disks": {"vda": q.uri}}), chain, "p2", dp_sock_dir, None)
    st = r2[0].stats
    assert st.bytes_written == 1 * MiB
    assert st.bytes_zeroed == 15 * MiB
    p2 = chain.path_of("p2")
    assert images_equal(img, p2, "raw", "qcow2").returncode == 0
    # The overlay holds zero clusters, not 15 MiB of zero data.
    assert p2.stat().st_size < 4 * MiB
    assert check_ok(p2) in (0, 3)


def test_blocksize_limits_respected(nbdkit_server, make_chain, dp_sock_dir):
    """Row 7 (engine level): a server advertising 4 KiB minimum and 64 KiB maximum rejects
    any request over the maximum (blocksize-policy error mode); the copy still succeeds."""
    srv = nbdkit_server(
        "--filter=blocksize-policy",
        "sparse-random",
        "size=32M",
        "seed=3",
        "percent=50",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    )
    chain = make_chain("vda")
    _, res = _sync_nbd(NbdSource({"disks": {"vda": srv.uri}}), chain, "p1", dp_sock_dir, None)
    assert res[0].stats.request_size == 65536
    assert images_equal(srv.uri, chain.path_of("p1"), fb="qcow2").returncode == 0
    assert check_ok(chain.path_of("p1")) in (0, 3)


def test_throttle_limits_rate_and_changes_live(nbdkit_server, make_chain, dp_sock_dir):
    srv = nbdkit_server("sparse-random", "size=24M", "percent=100", "seed=5")
    chain = make_chain("vda")
    throttle = Throttle(8 * MiB)
    changed = threading.Event()

    def speed_up() -> None:
        time.sleep(1.0)
        throttle.set_rate(None)
        changed.set()

    threading.Thread(target=speed_up, daemon=True).start()
    t0 = time.monotonic()
    _, _res = _sync_nbd(
        NbdSource({"disks": {"vda": srv.uri}}), chain, "p1", dp_sock_dir, None, throttle=throttle
    )
    dt = time.monotonic() - t0
    assert changed.is_set()
    # 24 MiB at 8 MiB/s would take 3 s; the first second is throttled, the rest is not.
    assert 0.9 < dt < 2.9
    assert images_equal(srv.uri, chain.path_of("p1"), fb="qcow2").returncode == 0


def test_cancel_keeps_journal_and_resume_completes(
    nbdkit_server, make_chain, dp_sock_dir, recording_journal
):
    srv = nbdkit_server(
        "--filter=delay", "sparse-random", "size=128M", "percent=100", "seed=9", "delay-read=300ms"
    )
    chain = make_chain("vda")
    src = NbdSource({"disks": {"vda": srv.uri}, "snapshot_id": "snap-A"})
    session = src.open_session(src.ref(), None)
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    from appliance.errors import Cancelled

    with pytest.raises(Cancelled):
        sync_disks(
            session,
            {"vda": chain},
            point_name="p1",
            socket_dir=dp_sock_dir,
            cancel=cancel,
            journal=recording_journal,
            flush_interval=0.2,
        )
    done = recording_journal.ranges("vda")
    assert done and ex.total(ex.Extent(o, n, False) for o, n in done) < 128 * MiB
    assert chain.points() == []  # nothing published
    j2 = RecordingJournal()
    session = src.open_session(src.ref(), None)
    res = sync_disks(
        session,
        {"vda": chain},
        point_name="p1",
        socket_dir=dp_sock_dir,
        journal=j2,
        resume_from={"vda": done},
    )
    assert res[0].resumed
    st = res[0].stats
    assert st.bytes_skipped_resume == ex.total(
        ex.Extent(o, n, False) for o, n in ex.coalesce_ranges(done)
    )
    assert st.bytes_read == 128 * MiB - st.bytes_skipped_resume
    assert images_equal(srv.uri, chain.path_of("p1"), fb="qcow2").returncode == 0
    assert check_ok(chain.path_of("p1")) in (0, 3)


def test_hash_manifest_matches_between_source_and_point(
    nbdkit_server, make_chain, dp_sock_dir, qemu_nbd_server
):
    srv = nbdkit_server("sparse-random", "size=48M", "percent=30", "seed=17")
    chain = make_chain("vda")
    _sync_nbd(NbdSource({"disks": {"vda": srv.uri}}), chain, "p1", dp_sock_dir, None)
    rd = qemu_nbd_server(chain.path_of("p1"), read_only=True)
    vr = verify(srv.uri, rd.uri, disk="vda")
    assert vr.ok and vr.blocks == 48
    a = hash_export(srv.uri)
    assert a.digest() == vr.target.digest()


def test_copier_direct_api_request_pattern(nbdkit_server, qemu_nbd_server, make_image):
    """The Copier on its own: extents from block status, stats add up."""
    srv = nbdkit_server("sparse-random", "size=32M", "percent=40", "seed=2")
    dst = make_image("dst.qcow2", 32 * MiB, fmt="qcow2")
    w = qemu_nbd_server(dst)
    h = connect(srv.uri, contexts=[ex.BASE_ALLOCATION])
    exts, note = ex.query_extents(h, h.get_size())
    del h
    assert note == ""
    data = sum(e.length for e in exts if not e.zero)
    st = Copier(disk_key="vda", source_uri=srv.uri, target_uri=w.uri, target_is_zero=True).copy(
        exts
    )
    assert st.bytes_read == data and st.bytes_written == data
    w.stop()
    assert images_equal(srv.uri, dst, fb="qcow2").returncode == 0
    assert check_ok(dst) in (0, 3)


def test_copy_disk_then_seal_two_step(nbdkit_server, make_chain, dp_sock_dir):
    srv = nbdkit_server("memory", "size=8M")
    chain = make_chain("vda")
    src = NbdSource({"disks": {"vda": srv.uri}})
    session = src.open_session(src.ref(), None)
    ov, res = copy_disk(
        session.disks[0], chain, point_name="p1", snapshot_id="s", socket_dir=dp_sock_dir
    )
    assert chain.points() == [] and ov.path.exists()
    seal_disk(ov, res)
    assert [p.name for p in chain.points()] == ["p1"]
    assert images_equal(srv.uri, chain.path_of("p1"), fb="qcow2").returncode == 0
