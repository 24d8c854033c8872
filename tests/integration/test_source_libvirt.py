"""A real libvirt domain (type='qemu', TCG) that writes to its own disk while protected.

Full sync, then incrementals that carry only what the guest wrote; each restore point equals
what the backup export served (hashed over NBD before the job ends) bit for bit.
"""

from __future__ import annotations

import time

import libvirt
import pytest

from appliance.datapath import extents as ex
from appliance.datapath.hashing import hash_export
from appliance.datapath.writer import QemuNbd
from appliance.replication import sync_disks
from appliance.sources.base import Consistency
from appliance.sources.libvirt import LibvirtSource
from tests.datapath_fixtures import *  # noqa: F403
from tests.datapath_fixtures import MiB, check_ok

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def _point_hash(chain, name, sock):
    with QemuNbd(chain.path_of(name), sock, read_only=True) as rd:
        return hash_export(rd.uri)


def _sync(src, guest, chain, name, sock, token):
    session = src.open_session(guest.uuid, token)
    try:
        exts = {d.disk.key: list(d.extents()) for d in session.disks}
        res = sync_disks(session, {"vda": chain}, point_name=name, socket_dir=sock)
        # What the backup export served, read a second time while the job still runs.
        served = hash_export(session.disks[0].nbd_uri)
        tok = session.token()
    finally:
        session.release()
    return session, res[0], exts["vda"], served, tok


def test_libvirt_full_then_incremental_of_a_writing_guest(tiny_guest, make_chain, dp_sock_dir):
    g = tiny_guest(64 * MiB, [(16 * MiB, 8 * MiB, 1), (40 * MiB, 2 * MiB, 2)])
    g.wait_ready()
    src = LibvirtSource("qemu:///system", run_dir=dp_sock_dir / "backup")
    src.test()
    machines = {m.ref: m for m in src.discover()}
    m = machines[g.uuid]
    assert m.power_state == "running" and m.cpus == 1 and m.memory_mib == 160
    assert [d.key for d in m.disks] == ["vda"] and m.disks[0].size == 64 * MiB
    assert m.nics and m.nics[0]["mac"].startswith("52:54:00") and m.firmware == "bios"

    chain = make_chain("vda")
    s1, r1, _, served1, tok1 = _sync(src, g, chain, "p1", dp_sock_dir, None)
    assert s1.full and r1.mode == "full"
    # No guest agent in this guest: the point is crash-consistent, and says so and why.
    assert s1.consistency == Consistency.CRASH_CONSISTENT
    assert len(s1.notes) == 1 and "not quiesced: the guest agent" in s1.notes[0], s1.notes
    assert _point_hash(chain, "p1", dp_sock_dir).digest() == served1.digest()
    assert check_ok(chain.path_of("p1")) in (0, 3)
    # The job is over after release: no backup job left on the domain.
    assert g.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE

    time.sleep(3)  # the guest keeps writing 64 KiB blocks into its first 16 MiB
    s2, r2, exts2, served2, tok2 = _sync(src, g, chain, "p2", dp_sock_dir, tok1)
    assert not s2.full and r2.mode == "dirty"
    dirty = sum(e.length for e in exts2 if not e.zero)
    # Only the blocks written: inside the first 16 MiB, some of them, nothing else.
    assert 0 < r2.stats.bytes_read == dirty <= 16 * MiB
    assert all(e.end <= 16 * MiB for e in exts2)
    assert _point_hash(chain, "p2", dp_sock_dir).digest() == served2.digest()
    assert served2.digest() != served1.digest()
    assert check_ok(chain.path_of("p2")) in (0, 3)
    # Old checkpoints are pruned: at most the committed one and the newest remain.
    names = [c.getName() for c in g.dom.listAllCheckpoints(0)]
    assert tok2["checkpoint"] in names and len(names) <= 2

    # libvirt loses its checkpoint metadata: the next sync is a full one and says why.
    g.dom.checkpointLookupByName(tok2["checkpoint"]).delete(
        libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
    )
    s3, r3, _, served3, _ = _sync(src, g, chain, "p3", dp_sock_dir, tok2)
    assert s3.full and "missing" in s3.reason
    assert r3.mode == "full"
    assert _point_hash(chain, "p3", dp_sock_dir).digest() == served3.digest()
    assert check_ok(chain.path_of("p3")) in (0, 3)
    assert [p.name for p in chain.points()] == ["p1", "p2", "p3"]
    _ = ex


def test_libvirt_failure_always_ends_the_job(tiny_guest, make_chain, dp_sock_dir):
    g = tiny_guest(32 * MiB)
    g.wait_ready()
    src = LibvirtSource("qemu:///system", run_dir=dp_sock_dir / "backup")
    session = src.open_session(g.uuid, None)
    assert g.dom.jobInfo()[0] != libvirt.VIR_DOMAIN_JOB_NONE
    # A sync that fails (no chain for the disk) still releases the backup job.
    with pytest.raises(Exception, match="no chain"):
        try:
            sync_disks(session, {}, point_name="p1", socket_dir=dp_sock_dir)
        finally:
            session.release()
    assert g.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    # A crashed daemon's job left running is ended by the next session.
    s1 = src.open_session(g.uuid, None)
    s2 = src.open_session(g.uuid, None)  # ends s1's job, starts its own
    assert s2.snapshot_id != s1.snapshot_id
    s2.release()
    s1.release()
    assert g.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE


def test_libvirt_daemon_crash_reattaches_and_resumes(tiny_guest, make_chain, dp_sock_dir):
    """The engine dies mid-sync (its session object is lost, the backup job keeps running in
    libvirtd); a new adapter reattaches to the same snapshot and resumes from the journal."""
    import threading

    from appliance.datapath.throttle import Throttle
    from appliance.errors import Cancelled
    from tests.datapath_fixtures import RecordingJournal

    g = tiny_guest(64 * MiB, [(16 * MiB, 32 * MiB, 5)])
    g.wait_ready()
    chain = make_chain("vda")
    journal = RecordingJournal()
    s1 = LibvirtSource("qemu:///system", run_dir=dp_sock_dir / "backup").open_session(g.uuid, None)
    cancel = threading.Event()
    threading.Timer(1.0, cancel.set).start()
    with pytest.raises(Cancelled):
        sync_disks(
            s1,
            {"vda": chain},
            point_name="p1",
            socket_dir=dp_sock_dir,
            journal=journal,
            cancel=cancel,
            throttle=Throttle(8 * MiB),
            flush_interval=0.2,
        )
    done = journal.ranges("vda")
    assert done
    # "Restart": a fresh adapter, the old session object forgotten (not released).
    src2 = LibvirtSource("qemu:///system", run_dir=dp_sock_dir / "backup")
    assert src2.reattach(g.uuid, "ferryman-not-this-one") is None
    s2 = src2.reattach(g.uuid, s1.snapshot_id)
    assert s2 is not None and s2.snapshot_id == s1.snapshot_id and s2.full
    try:
        res = sync_disks(
            s2, {"vda": chain}, point_name="p1", socket_dir=dp_sock_dir, resume_from={"vda": done}
        )
        served = hash_export(s2.disks[0].nbd_uri)
    finally:
        s2.release()
    assert res[0].resumed and res[0].stats.bytes_skipped_resume > 0
    assert _point_hash(chain, "p1", dp_sock_dir).digest() == served.digest()
    assert check_ok(chain.path_of("p1")) in (0, 3)
    assert g.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
    assert src2.reattach(g.uuid, s1.snapshot_id) is None  # job over: nothing to reattach


def _ext4_features(chain, name, dp_dir) -> tuple[str, int]:
    """dumpe2fs -h of the point's filesystem and e2fsck -fn's exit code."""
    import subprocess

    raw = dp_dir / f"{name}.raw"
    subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(chain.path_of(name)), str(raw)], check=True
    )
    try:
        feats = subprocess.run(
            ["dumpe2fs", "-h", str(raw)], capture_output=True, text=True, check=True
        ).stdout
        fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True)
    finally:
        raw.unlink()
    line = next(x for x in feats.splitlines() if x.startswith("Filesystem features:"))
    return line, fsck.returncode


def _agent_answers(name: str, timeout: float = 300.0) -> None:
    import subprocess

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ping = ["virsh", "-c", "qemu:///system", "qemu-agent-command", name]
        r = subprocess.run([*ping, '{"execute":"guest-ping"}'], capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(1)
    pytest.fail(f"the guest agent of {name} did not answer guest-ping: {r.stderr.strip()}")


def test_libvirt_guest_agent_quiesces_else_crash_consistent(
    tiny_guest, make_chain, dp_dir, dp_sock_dir
):
    """A guest whose qemu-ga answers: the filesystem is frozen around the checkpoint, the
    point says 'quiesced', and its ext4 is clean (no journal to replay). With the freeze
    off, the same guest's point is crash-consistent: its ext4 still needs recovery."""
    g = tiny_guest(64 * MiB, agent=True)
    g.wait_ready()
    _agent_answers(g.name)
    src = LibvirtSource("qemu:///system", run_dir=dp_sock_dir / "backup")
    chain = make_chain("vda")
    s1, _, _, served1, tok1 = _sync(src, g, chain, "p1", dp_sock_dir, None)
    assert s1.consistency == Consistency.QUIESCED and s1.notes == []
    assert tok1["consistency"] == "quiesced"
    assert _point_hash(chain, "p1", dp_sock_dir).digest() == served1.digest()
    feats, fsck = _ext4_features(chain, "p1", dp_dir)
    assert "needs_recovery" not in feats and fsck == 0, (feats, fsck)
    # The guest was thawed: it goes on writing (the next incremental carries its writes).
    time.sleep(3)
    plain = LibvirtSource("qemu:///system", run_dir=dp_sock_dir / "backup", quiesce="no")
    s2, r2, _, served2, _ = _sync(plain, g, chain, "p2", dp_sock_dir, tok1)
    assert not s2.full and r2.stats.bytes_read > 0
    assert s2.consistency == Consistency.CRASH_CONSISTENT
    assert _point_hash(chain, "p2", dp_sock_dir).digest() == served2.digest()
    feats2, _ = _ext4_features(chain, "p2", dp_dir)
    assert "needs_recovery" in feats2, feats2  # mounted, not frozen: a crash image
    assert check_ok(chain.path_of("p2")) in (0, 3)
