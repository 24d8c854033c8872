"""linux-agent source against a real Debian server (TCG guest, real sshd, real LVM).

The data path is the engine's: ``appliance.replication.sync_disks`` (copier + qcow2
chain + qemu-nbd writer) reads the adapter's ``nbd_uri``; the one engine step the adapter
needs beyond that (store ``export.manifest`` with the sealed point) is done here as
``replication.py`` is asked to do it (docs/agent.md, "Engine hooks").

Every restore point is compared with the LVM snapshot it came from: the snapshot is hashed
ON THE SERVER (sha256sum of the snapshot LV) before the session releases it.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.datapath.chain import DiskChain
from appliance.datapath.copier import RetryPolicy
from appliance.datapath.throttle import Throttle
from appliance.errors import Cancelled
from appliance.replication import DiskResult, manifest_path, sync_disks
from appliance.sources.agent.errors import (
    AgentHostKeyChanged,
    AgentSnapshotError,
    AgentSnapshotFull,
)
from appliance.sources.agent.source import AgentSession, LinuxAgentSource
from appliance.sources.agent.ssh import HostKey
from appliance.sources.base import Consistency
from appliance.units import MiB
from tests.agent_fixtures import DATA_LV_MIB, AgentGuest, assert_clean, image_sha256

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


class Recorder:
    """ProgressSink that remembers how far the copy got."""

    def __init__(self) -> None:
        self.done = 0
        self.total = 0

    def set_total(self, total: int) -> None:
        self.total = total

    def update(self, n: int) -> None:
        self.done += n

    def set_phase(self, phase: str, **extra: Any) -> None:
        pass


class Journal:
    def __init__(self) -> None:
        self.rows: dict[str, list[tuple[int, int]]] = {}

    def done(self, disk_key: str, offset: int, length: int) -> None:
        self.rows.setdefault(disk_key, []).append((offset, length))


def run_sync(
    session: AgentSession,
    store: Path,
    name: str,
    **kw: Any,
) -> list[DiskResult]:
    chains = {d.disk.key: DiskChain(store / d.disk.key) for d in session.disks}
    sockets = store / "sockets"
    sockets.mkdir(exist_ok=True)
    results = sync_disks(session, chains, point_name=name, socket_dir=sockets, **kw)
    for d, r in zip(session.disks, results, strict=True):
        # The engine hook (replication.py): the source's manifest is stored with the point.
        assert r.point is not None
        if d.manifest is not None:
            d.manifest.save(manifest_path(chains[d.disk.key], r.point.name))
    return results


def point_sha256(store: Path, key: str, result: DiskResult, tmp: Path) -> str:
    assert result.point is not None
    return image_sha256(store / key / result.point.file, tmp)


def machine_ref(guest: AgentGuest) -> str:
    return guest.ssh("cat /etc/machine-id").strip()


def test_discover_inventory(agent_source: LinuxAgentSource, agent_guest: AgentGuest) -> None:
    t0 = time.monotonic()
    m = agent_source.discover()[0]
    took = time.monotonic() - t0
    assert m.ref == agent_guest.ssh("cat /etc/machine-id").strip()
    assert m.name == "agent-server"
    assert m.guest_os.startswith("Debian GNU/Linux 12")
    assert [d.key for d in m.disks] == ["vgdata-data"]
    assert m.disks[0].size == DATA_LV_MIB * MiB
    d = m.details
    assert d["kernel"]["release"] == agent_guest.ssh("uname -r").strip()
    lvs = {f"{r['vg_name']}/{r['lv_name']}" for r in d["lvm"]["lvs"]}
    assert {"vg0/root", "vgdata/data"} <= lvs
    assert {v["vg_name"] for v in d["lvm"]["vgs"]} == {"vg0", "vgdata"}
    mounts = {x["target"]: x["fstype"] for x in d["mounts"]}
    assert mounts["/srv/data"] == "ext4" and mounts["/"] == "ext4"
    names = {b["name"] for b in d["block_devices"]}
    assert {"vda", "vdb", "vdc"} <= names
    vda = next(b for b in d["block_devices"] if b["name"] == "vda")
    assert {c["name"] for c in vda["children"]} == {"vda1", "vda2"}
    eth0 = next(i for i in d["network"]["interfaces"] if i["name"] == "eth0")
    assert "10.0.2.15/24" in eth0["addresses"]
    assert "ifupdown" in d["network"]["config"]["tools"]
    assert m.nics and m.nics[0]["name"] == "eth0"
    assert m.cpus == 1 and m.memory_mib > 500 and m.firmware == "bios"
    assert_clean(agent_guest)
    print(f"discover took {took:.1f}s")


def test_full_then_incremental_equal_to_snapshot(
    agent_source: LinuxAgentSource, agent_guest: AgentGuest, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    agent_guest.write("/srv/data/a.bin", 40)
    ref = machine_ref(agent_guest)

    t0 = time.monotonic()
    s1 = agent_source.open_session(ref, None)
    try:
        t_open = time.monotonic() - t0
        print("open_session steps:", s1.timings)
        assert s1.full and s1.reason == "vgdata-data: first sync"
        assert s1.consistency is Consistency.CRASH_CONSISTENT
        assert s1.freeze["frozen"] == ["/srv/data"], s1.freeze
        d1 = s1.disks[0]
        assert d1.mode == "full" and d1.snapshot.startswith("vgdata/data_fm")
        r1 = run_sync(s1, store, "rp000001")
        snap_hash = agent_guest.sha256_of("/dev/" + d1.snapshot)
        # Frozen at the instant of the snapshot: ext4 cleared its journal's needs_recovery
        # flag (a crash-only copy of a mounted ext4 carries it).
        feats = agent_guest.ssh(f"dumpe2fs -h /dev/{d1.snapshot} 2>/dev/null | grep -i features")
        assert "has_journal" in feats and "needs_recovery" not in feats, feats
        assert "needs_recovery" in agent_guest.ssh(
            "dumpe2fs -h /dev/vgdata/data 2>/dev/null | grep -i features"
        )
        token1 = s1.token()
    finally:
        s1.release()
    t_full = time.monotonic() - t0
    assert_clean(agent_guest)
    assert point_sha256(store, "vgdata-data", r1[0], tmp_path) == snap_hash
    st1 = r1[0].stats
    # Only non-zero blocks crossed the wire: the 40 MiB file plus ext4 metadata.
    assert 40 * MiB <= st1.bytes_read == d1.changed_bytes < 60 * MiB, st1
    assert st1.bytes_read < DATA_LV_MIB * MiB / 2

    agent_guest.write("/srv/data/b.bin", 8)
    t0 = time.monotonic()
    s2 = agent_source.open_session(ref, token1)
    try:
        assert not s2.full and s2.reason == ""
        d2 = s2.disks[0]
        assert d2.mode == "dirty"
        r2 = run_sync(s2, store, "rp000002")
        snap_hash2 = agent_guest.sha256_of("/dev/" + d2.snapshot)
        token2 = s2.token()
    finally:
        s2.release()
    t_incr = time.monotonic() - t0
    assert_clean(agent_guest)
    assert point_sha256(store, "vgdata-data", r2[0], tmp_path) == snap_hash2
    assert snap_hash2 != snap_hash
    st2 = r2[0].stats
    # Bytes sent close to the bytes changed: 8 MiB of file data plus the few ext4 metadata
    # and journal blocks the write touched, each rounded to a 1 MiB hash block (measured:
    # 12-13 MiB).
    assert 8 * MiB <= st2.bytes_read <= 16 * MiB, st2
    assert token2["disks"]["vgdata-data"]["manifest"] != token1["disks"]["vgdata-data"]["manifest"]
    # The manifest stored with the point is the snapshot's, block for block.
    man2 = manifest_path(DiskChain(store / "vgdata-data"), "rp000002")
    assert man2.exists()
    print(
        f"full: open {t_open:.1f}s total {t_full:.1f}s read {st1.bytes_read / MiB:.1f} MiB "
        f"in {st1.elapsed_s:.1f}s; incremental: total {t_incr:.1f}s "
        f"read {st2.bytes_read / MiB:.1f} MiB in {st2.elapsed_s:.1f}s"
    )


def test_snapshot_space_exhausted(
    agent_guest: AgentGuest, agent_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    assert agent_guest.host_key is not None
    src = LinuxAgentSource(
        host="127.0.0.1",
        port=agent_guest.port,
        identity=agent_guest.key,
        host_key=agent_guest.host_key.line,
        run_dir=agent_dirs[0],
        state_dir=agent_dirs[1],
        volumes=["vgdata/data"],
        snapshot_size="8M",
    )
    s = src.open_session(machine_ref(agent_guest), None)
    cancel = threading.Event()
    try:
        # The server writes more than the snapshot can hold while the sync runs.
        want = agent_guest.ssh(
            "head -c 24M /dev/urandom | tee /srv/data/burst.bin | sha256sum; sync"
        ).split()[0]
        s.watch(cancel, interval=1.0)
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            run_sync(
                s,
                tmp_path / "store",
                "rp000001",
                cancel=cancel,
                retry=RetryPolicy(retry_window=120.0),
            )
        stopped = time.monotonic() - t0
        err = s.failure()
        assert isinstance(err, AgentSnapshotFull)
        assert "vgdata/data" in err.message and "untouched" in err.message
        assert "snapshot_size" in (err.hint or "")
    finally:
        s.release()
    assert_clean(agent_guest)
    # The origin is untouched: the burst file reads back whole after dropping the caches.
    got = agent_guest.ssh(
        "sync; echo 3 > /proc/sys/vm/drop_caches; sha256sum /srv/data/burst.bin"
    ).split()[0]
    assert got == want
    attr = agent_guest.ssh("lvs --noheadings -o lv_attr vgdata/data").strip()
    assert attr[4] == "a"  # active
    agent_guest.ssh("rm /srv/data/burst.bin; sync")
    print(f"overflow noticed and the copy stopped after {stopped:.1f}s")


def test_ssh_dropped_mid_sync_then_resumed_by_the_next_session(
    agent_guest: AgentGuest, agent_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Two faults in one sync, served by the helper's built-in NBD server (the fallback):

    1. at 30 % the link dies (the SSH master and every channel are killed): the copier
       reconnects to the same snapshot through a new SSH connection;
    2. at 60 % the job stops, and the server is unreachable when the session is released,
       so the snapshot stays. The next session finds it and keeps its identity, and the
       engine's journal resume copies only what was not durable yet.
    """
    if agent_guest.proc is None:
        pytest.fail("needs a guest started by this session (it is paused)")
    assert agent_guest.host_key is not None
    src = LinuxAgentSource(
        host="127.0.0.1",
        port=agent_guest.port,
        identity=agent_guest.key,
        host_key=agent_guest.host_key.line,
        run_dir=agent_dirs[0],
        state_dir=agent_dirs[1],
        volumes=["vgdata/data"],
        snapshot_size="64M",
        nbd_server="builtin",
    )
    store = tmp_path / "store"
    ref = machine_ref(agent_guest)
    journal = Journal()
    prog = Recorder()
    cancel = threading.Event()
    killed: list[int] = []
    s1 = src.open_session(ref, None)
    try:
        d1 = s1.disks[0]
        fwd = s1.forwarders[0]

        def faults() -> None:
            while not prog.total or prog.done < prog.total * 0.3:
                time.sleep(0.05)
            pids = [p for p in [s1.ssh.master_pid, *fwd.alive_pids()] if p]
            for p in pids:
                subprocess.run(["kill", "-9", str(p)], check=False)
            killed.extend(pids)
            while prog.done < prog.total * 0.6:
                time.sleep(0.05)
            cancel.set()

        threading.Thread(target=faults, daemon=True).start()
        t0 = time.monotonic()
        with pytest.raises(Cancelled):
            run_sync(
                s1,
                store,
                "rp000001",
                progress=prog,
                cancel=cancel,
                journal=journal,
                throttle=Throttle(6 * MiB),
                flush_every=4 * MiB,
            )
        first_s = time.monotonic() - t0
        agent_guest.pause()
        try:
            with pytest.raises(AgentSnapshotError):
                s1.release()
        finally:
            agent_guest.resume()
    finally:
        with contextlib.suppress(AgentSnapshotError):
            s1.release()
    assert killed, "the link was never dropped"
    durable = sum(n for _, n in journal.rows["vgdata-data"])
    assert 0 < durable < d1.disk.size
    assert agent_guest.snapshots() == [d1.snapshot]

    s2 = src.open_session(ref, None)
    try:
        assert s2.resumed_snapshot and s2.snapshot_id == s1.snapshot_id
        d2 = s2.disks[0]
        r = run_sync(s2, store, "rp000001", resume_from=journal.rows)
        snap_hash = agent_guest.sha256_of("/dev/" + d2.snapshot)
    finally:
        s2.release()
    assert_clean(agent_guest)
    st = r[0].stats
    assert r[0].resumed and st.bytes_skipped_resume == durable
    assert point_sha256(store, "vgdata-data", r[0], tmp_path) == snap_hash
    # What the first attempt made durable is not read again.
    data_done = sum(
        max(0, min(e.end, o + n) - max(e.offset, o))
        for e in d2.planned
        if not e.zero
        for o, n in journal.rows["vgdata-data"]
    )
    assert data_done > 0
    data_left = d2.changed_bytes - data_done
    assert st.bytes_read <= data_left + 16 * MiB, (st, data_left)
    print(
        f"link dropped at 30 % (reconnected), stopped at 60 % after {first_s:.1f}s with "
        f"{durable / MiB:.1f} MiB durable; the next session read {st.bytes_read / MiB:.1f} "
        f"MiB of {d2.changed_bytes / MiB:.1f} MiB data"
    )


def test_host_key_changed_refused(
    agent_guest: AgentGuest, agent_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True
    )
    other = HostKey.parse((tmp_path / "other.pub").read_text())
    src = LinuxAgentSource(
        host="127.0.0.1",
        port=agent_guest.port,
        identity=agent_guest.key,
        host_key=other.line,
        run_dir=agent_dirs[0],
        state_dir=agent_dirs[1],
        volumes=["vgdata/data"],
    )
    before = agent_guest.accepted_logins()
    with pytest.raises(AgentHostKeyChanged) as e1:
        src.test()
    with pytest.raises(AgentHostKeyChanged):
        src.open_session("", None)
    after = agent_guest.accepted_logins()
    # Only this test's own journal query logged in: the adapter never authenticated.
    assert after == before + 1
    assert other.fingerprint in e1.value.message
    assert agent_guest.host_key is not None
    assert agent_guest.host_key.fingerprint in e1.value.message  # what the server showed
    assert_clean(agent_guest)
    assert list(agent_dirs[0].iterdir()) == []  # no key copies, sockets or known_hosts left


def test_host_key_pinned_at_first_contact(
    agent_guest: AgentGuest, agent_dirs: tuple[Path, Path]
) -> None:
    pinned: list[HostKey] = []
    src = LinuxAgentSource(
        host="127.0.0.1",
        port=agent_guest.port,
        identity=agent_guest.key,
        host_key=None,
        on_host_key=pinned.append,
        run_dir=agent_dirs[0],
        state_dir=agent_dirs[1],
    )
    src.test()
    assert agent_guest.host_key is not None
    assert [k.fingerprint for k in pinned] == [agent_guest.host_key.fingerprint]
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", pinned[0].fingerprint)
    assert_clean(agent_guest)


def test_live_copy_without_lvm_converges(
    agent_guest: AgentGuest, agent_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """/dev/vdc (ext4 on /srv/live) is not on LVM: copied live, points labelled
    crash-inconsistent; the second pass copies what changed plus what changed while the
    first pass read it; the final pass at cutover (``open_final_pass``) freezes the
    filesystem for the whole copy: consistent, labelled crash-consistent, with a manifest."""
    assert agent_guest.host_key is not None
    src = LinuxAgentSource(
        host="127.0.0.1",
        port=agent_guest.port,
        identity=agent_guest.key,
        host_key=agent_guest.host_key.line,
        run_dir=agent_dirs[0],
        state_dir=agent_dirs[1],
        volumes=[],
        live_devices=["/dev/vdc"],
    )
    store = tmp_path / "store"
    ref = machine_ref(agent_guest)
    s1 = src.open_session(ref, None)
    try:
        assert s1.consistency is Consistency.CRASH_INCONSISTENT and s1.snapshots == []
        d1 = s1.disks[0]
        assert d1.disk.key == "vdc" and d1.manifest is None and d1.mode == "full"
        r1 = run_sync(s1, store, "rp000001")
        token1 = s1.token()
        dev_hash = agent_guest.sha256_of("/dev/vdc")  # nothing writes: live == copied
    finally:
        s1.release()
    assert_clean(agent_guest)
    assert point_sha256(store, "vdc", r1[0], tmp_path) == dev_hash
    assert d1.changed_during_copy == 0

    agent_guest.ssh("head -c 3M /dev/urandom > /srv/live/pass2.bin && sync")
    try:
        s2 = src.open_session(ref, token1)
        try:
            d2 = s2.disks[0]
            assert d2.mode == "dirty" and not s2.full
            r2 = run_sync(s2, store, "rp000002")
            token2 = s2.token()
            dev_hash2 = agent_guest.sha256_of("/dev/vdc")
        finally:
            s2.release()
        assert point_sha256(store, "vdc", r2[0], tmp_path) == dev_hash2
        st2 = r2[0].stats
        assert 3 * MiB <= st2.bytes_read <= 6 * MiB, st2

        # The final pass at cutover, services stopped: data still in the page cache (no
        # sync) must reach the copy, and the filesystem stays frozen from before hashing
        # until release, so the point is consistent and carries the server's manifest.
        agent_guest.ssh("head -c 2M /dev/urandom > /srv/live/final.bin")
        s3 = src.open_final_pass(ref, token2)
        try:
            assert s3.consistency is Consistency.CRASH_CONSISTENT, s3.notes
            assert s3.freeze["live_frozen"] == ["/srv/live"]
            d3 = s3.disks[0]
            assert d3.mode == "dirty" and d3.manifest is not None
            # A writer that starts now waits for the thaw.
            agent_guest.ssh("nohup sh -c 'echo late > /srv/live/late.txt' >/dev/null 2>&1 &")
            r3 = run_sync(s3, store, "rp000003")
            dev_hash3 = agent_guest.sha256_of("/dev/vdc")
            # Frozen = clean: ext4 flushed its journal (a live copy carries needs_recovery).
            feats = agent_guest.ssh("dumpe2fs -h /dev/vdc 2>/dev/null | grep -i features")
            assert "has_journal" in feats and "needs_recovery" not in feats, feats
            assert agent_guest.ssh("test -e /srv/live/late.txt || echo absent").strip() == "absent"
            s3.token()
        finally:
            s3.release()
        assert s3.freeze["thawed"] == ["/srv/live"]
        assert point_sha256(store, "vdc", r3[0], tmp_path) == dev_hash3
        assert manifest_path(DiskChain(store / "vdc"), "rp000003").exists()  # verifiable
        end = time.monotonic() + 60
        while agent_guest.ssh("cat /srv/live/late.txt 2>/dev/null || true").strip() != "late":
            assert time.monotonic() < end, "the write held by the freeze never landed"
            time.sleep(1)
        assert_clean(agent_guest)
    finally:
        agent_guest.ssh("rm -f /srv/live/pass2.bin /srv/live/final.bin /srv/live/late.txt; sync")
    print(
        f"live: pass 1 read {r1[0].stats.bytes_read / MiB:.1f} MiB, pass 2 "
        f"{st2.bytes_read / MiB:.1f} MiB for 3 MiB written; final frozen pass "
        f"{r3[0].stats.bytes_read / MiB:.1f} MiB, open {s3.timings}"
    )
