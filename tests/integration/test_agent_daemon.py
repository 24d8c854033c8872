"""A Linux server through ferrymand and the CLI, as a field engineer adds one: the host key
confirmed at first contact, discover, protect, full then incremental sync, each restore point
equal to the LVM snapshot it came from; a snapshot that runs out of room fails its job at
once with the reason; then the server's host key changes and the daemon refuses it before
any command runs. After each step nothing of the agent is left on the server.

The server is the session's ``agent_guest`` (tests/agent_fixtures.py), shared with
test_agent.py: one TCG boot for both files. The snapshot is hashed ON THE SERVER while the
sync job runs: the machine is protected with the smallest throttle (64 KiB/s), so the copy
cannot end before the test has hashed the snapshot; then the throttle is lifted on the
running job (``ferryman set --no-throttle``) and the job completes.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import FerrymanError
from appliance.sources.agent.ssh import scan_host_key
from appliance.units import MiB
from tests.agent_fixtures import DATA_LV_MIB, AgentGuest, assert_clean, image_digest
from tests.helpers.daemon import Daemon, Env, run_cli
from tests.helpers.nbdsrc import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1500)]

SNAPSHOT_WAIT_S = 600.0  # prepare + lvcreate under TCG on a loaded host


def sync_and_hash_snapshot(env: Env, guest: AgentGuest, machine: str) -> tuple[dict[str, Any], str]:
    """Start a sync (the machine's throttle holds the copy back), hash its LVM snapshot on the
    server while it exists, lift the throttle, wait for the job. -> (job, snapshot sha256)"""
    job = cli(env, "sync", machine)
    end = time.monotonic() + SNAPSHOT_WAIT_S
    snaps: list[str] = []
    while not snaps:
        assert time.monotonic() < end, f"no snapshot appeared on the server: {job}"
        j = cli(env, "job", "show", str(job["id"]))
        assert j["state"] in ("queued", "running"), j
        snaps = guest.snapshots()
        time.sleep(1)
    assert len(snaps) == 1 and snaps[0].startswith("vgdata/data_fm"), snaps
    snap_sha = guest.sha256_of("/dev/" + snaps[0])
    # Still copying at 64 KiB/s: the snapshot was hashed before the sync could release it.
    j = cli(env, "job", "show", str(job["id"]))
    assert j["state"] == "running", j
    cli(env, "set", machine, "--no-throttle")
    r = run_cli(env, "job", "show", str(job["id"]), "--wait", "--json", timeout=900)
    done = json.loads(r.stdout)
    assert done["state"] == "succeeded", done
    cli(env, "set", machine, "--throttle", "64KiB")
    return done, snap_sha


def wait_for_phase(env: Env, job_id: int, prefix: str) -> None:
    end = time.monotonic() + SNAPSHOT_WAIT_S
    while True:
        j = cli(env, "job", "show", str(job_id))
        assert j["state"] in ("queued", "running"), j
        if (j.get("progress") or {}).get("phase", "").startswith(prefix):
            return
        assert time.monotonic() < end, f"job {job_id} never reached '{prefix}': {j}"
        time.sleep(1)


def write_and_sync(
    env: Env, guest: AgentGuest, name: str, mib: int, tmp: Path
) -> tuple[dict[str, Any], dict[str, Any], str, int, float]:
    """The server writes a file, web01 syncs; the new restore point equals the snapshot and
    nothing is left on the server. -> (job result, point, sha256, non-zero MiB, seconds)"""
    guest.write(f"/srv/data/{name}", mib)
    t0 = time.monotonic()
    job, snap = sync_and_hash_snapshot(env, guest, "web01")
    took = time.monotonic() - t0
    assert_clean(guest)
    rp = cli(env, "points", "web01")[-1]
    assert [d["disk_key"] for d in rp["disks"]] == ["vgdata-data"]
    sha, nonzero = image_digest(Path(rp["disks"][0]["path"]), tmp)
    assert sha == snap, f"restore point {rp['id']} differs from its LVM snapshot"
    return job["result"], rp, sha, nonzero, took


@pytest.fixture
def fm_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """A store, socket and run dir under a SHORT path: ssh's control socket and the NBD
    sockets live in the run dir, and unix socket paths end at 107 bytes (pytest's tmp_path
    is too deep for them; the appliance's /run/ferryman is not)."""
    env = Env(Path(tempfile.mkdtemp(prefix="fm-agd-", dir="/tmp")))
    for k, v in env.vars().items():
        monkeypatch.setenv(k, v)
    try:
        yield env
    finally:
        shutil.rmtree(env.root, ignore_errors=True)


def test_linux_server_through_the_daemon(
    daemon: Daemon, fm_env: Env, agent_guest: AgentGuest, tmp_path: Path
) -> None:
    assert agent_guest.host_key is not None
    fp = agent_guest.host_key.fingerprint
    key = fm_env.root / "web01.key"  # as the engineer copied it onto the appliance
    key.write_bytes(agent_guest.key.read_bytes())
    key.chmod(0o600)
    uri = f"ssh://root@127.0.0.1:{agent_guest.port}"
    add = ["source", "add", "web01", "--kind", "linux-agent", "--uri", uri, "--key-file", str(key)]
    add += ["--param", "volumes=vgdata/data", "--param", "snapshot_size=64M"]

    # First contact: refused, with the fingerprint to confirm and the exact next step.
    r = run_cli(fm_env, *add)
    assert r.returncode == 1, r
    assert fp in r.stderr and f"--param host_key={fp}" in r.stderr, r.stderr
    assert not cli(fm_env, "sources")
    assert cli(fm_env, "source", "hostkey", uri)["fingerprint"] == fp
    # A confirmed fingerprint that is not the server's: refused, nothing stored.
    r = run_cli(fm_env, *add, "--param", "host_key=SHA256:" + "A" * 43)
    assert r.returncode == 1 and "not the confirmed" in r.stderr and fp in r.stderr, r.stderr
    assert not cli(fm_env, "sources")
    # Confirmed: the key is pinned (the whole key line, ssh needs it), the login tested.
    src = cli(fm_env, *add, "--param", f"host_key={fp}")
    assert src["params"]["host_key"] == agent_guest.host_key.line
    assert src["params"]["volumes"] == ["vgdata/data"]
    r = run_cli(fm_env, "sources")
    assert "pinned" in r.stdout, r.stdout
    secret = [ln for ln in key.read_text().splitlines() if "PRIVATE KEY" not in ln][1]
    assert secret.encode() not in fm_env.db.read_bytes(), "the private key is stored in clear"

    t0 = time.monotonic()
    cli(fm_env, "discover", "web01", "--wait")
    m = cli(fm_env, "machine", "show", "web01")
    assert m["ref"] == agent_guest.ssh("cat /etc/machine-id").strip()
    assert m["guest_os"].startswith("Debian GNU/Linux 12")
    assert [(d["key"], d["size"]) for d in m["disks"]] == [("vgdata-data", DATA_LV_MIB * MiB)]
    lvs = {f"{x['vg_name']}/{x['lv_name']}" for x in m["details"]["lvm"]["lvs"]}
    assert {"vg0/root", "vgdata/data"} <= lvs
    assert_clean(agent_guest)
    t_discover = time.monotonic() - t0
    cli(fm_env, "protect", "web01", "--throttle", "64KiB")

    # The LV holds what earlier tests of the session wrote: the proofs below are relative.
    res1, rp1, sha1, nonzero1, t_full = write_and_sync(fm_env, agent_guest, "d1.bin", 16, tmp_path)
    assert res1["full"] is True and res1["consistency"] == "crash-consistent", res1
    # Exactly the non-zero blocks crossed the link (zero blocks are written as zeroes).
    assert res1["bytes_read"] == nonzero1 * MiB, (res1, nonzero1)
    assert 16 <= nonzero1 < DATA_LV_MIB, nonzero1
    assert rp1["disks"][0]["manifest"], "the server's hash manifest is not stored with the point"

    res2, rp2, sha2, _, t_incr = write_and_sync(fm_env, agent_guest, "d2.bin", 6, tmp_path)
    assert res2["full"] is False and res2["reason"] == "", res2
    assert rp2["parent_id"] == rp1["id"] and sha2 != sha1
    # Bytes sent close to the bytes changed: 6 MiB of file plus the ext4 metadata and journal
    # blocks the write touched, each rounded up to a 1 MiB hash block.
    assert 6 * MiB <= res2["bytes_read"] <= 12 * MiB, res2
    # The point re-read here against the hashes the server computed of its snapshot.
    v = cli(fm_env, "verify", str(rp2["id"]), "--wait")
    assert v["state"] == "succeeded", v

    # Snapshot space exhausted during a sync (a second source on the same server, with
    # 8 MiB of copy-on-write room, 16 MiB written): the job fails at once with the source's
    # explanation, not after the copier's retry window; the origin is untouched, the
    # snapshot removed.
    small = ["source", "add", "web01-small", *add[3:], "--param", "snapshot_size=8M"]
    cli(fm_env, *small, "--param", f"host_key={fp}")
    cli(fm_env, "discover", "web01-small", "--wait")
    cli(fm_env, "protect", "web01-small", "--throttle", "64KiB")
    job = cli(fm_env, "sync", "web01-small")
    wait_for_phase(fm_env, job["id"], "copying")
    want = agent_guest.ssh("head -c 16M /dev/urandom | tee /srv/data/burst.bin | sha256sum; sync")
    t0 = time.monotonic()
    r = run_cli(fm_env, "job", "show", str(job["id"]), "--wait", "--json", timeout=900)
    failed = json.loads(r.stdout)
    t_overflow = time.monotonic() - t0
    assert failed["state"] == "failed", failed
    assert "ran out of copy-on-write space" in failed["error"], failed["error"]
    assert "vgdata/data itself is untouched" in failed["error"], failed["error"]
    assert t_overflow < 120, t_overflow
    assert_clean(agent_guest)
    got = agent_guest.ssh("sync; echo 3 > /proc/sys/vm/drop_caches; sha256sum /srv/data/burst.bin")
    assert got.split()[0] == want.split()[0]
    agent_guest.ssh("rm /srv/data/burst.bin; sync")
    assert not cli(fm_env, "points", "web01-small")

    # The server's host key changes (reinstalled, or another machine took its address):
    # refused by ssh during key exchange, before authentication, so nothing runs on it.
    with swapped_host_key(agent_guest) as new_fp:
        before = agent_guest.accepted_logins(pinned=False)
        r = run_cli(fm_env, "source", "test", "web01")
        assert r.returncode == 1 and new_fp in r.stderr and fp in r.stderr, r.stderr
        r = run_cli(fm_env, "sync", "web01", "--wait", "--json", timeout=600)
        job3 = json.loads(r.stdout)
        assert r.returncode == 1 and job3["state"] == "failed", job3
        assert "presented another SSH host key" in job3["error"] and new_fp in job3["error"]
        assert agent_guest.accepted_logins(pinned=False) == before + 1  # this query only
    assert len(cli(fm_env, "points", "web01")) == 2
    assert_clean(agent_guest)
    ev = cli(fm_env, "events", "--machine", "web01", "--limit", "200")
    assert any("presented another SSH host key" in e["message"] for e in ev), ev
    agent_guest.ssh("rm -f /srv/data/d1.bin /srv/data/d2.bin; sync")
    print(
        f"discover {t_discover:.1f}s; full sync {t_full:.1f}s read "
        f"{res1['bytes_read'] / MiB:.1f} MiB; incremental {t_incr:.1f}s read "
        f"{res2['bytes_read'] / MiB:.1f} MiB for 6 MiB written; overflow failed the job "
        f"{t_overflow:.1f}s after the burst"
    )


HOST_KEY = "/etc/ssh/ssh_host_ed25519_key"


def _wait_for_key(guest: AgentGuest, ok: Callable[[str], bool]) -> str:
    """The fingerprint sshd presents once ``ok`` accepts it (sshd restarts under TCG)."""
    end = time.monotonic() + 120
    while True:
        try:
            fp = scan_host_key("127.0.0.1", guest.port).fingerprint
            if ok(fp):
                return fp
        except FerrymanError:
            pass
        assert time.monotonic() < end, "sshd did not come back with the expected host key"
        time.sleep(1)


@contextlib.contextmanager
def swapped_host_key(guest: AgentGuest) -> Iterator[str]:
    """A new ed25519 host key on the server for the duration; the old one put back after."""
    assert guest.host_key is not None
    old = guest.host_key.fingerprint
    k = HOST_KEY
    guest.ssh(
        f"set -e; cp -a {k} /root/fm-hostkey; cp -a {k}.pub /root/fm-hostkey.pub; "
        f"rm -f {k} {k}.pub; ssh-keygen -q -t ed25519 -N '' -f {k}; systemctl restart ssh"
    )
    try:
        yield _wait_for_key(guest, lambda fp: fp != old)
    finally:
        guest.ssh(
            f"set -e; mv /root/fm-hostkey {k}; mv /root/fm-hostkey.pub {k}.pub; "
            "systemctl restart ssh",
            pinned=False,
        )
        _wait_for_key(guest, lambda fp: fp == old)
