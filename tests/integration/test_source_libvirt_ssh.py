"""libvirt over qemu+ssh://: this machine's libvirtd reached through a loopback sshd.

The test's own sshd (free 127.0.0.1 port, its own host key, one authorised key, root only)
stands in for the remote KVM host. libvirt's connection and the adapter's data path use the
same ssh options from the URI; a wrapper (the URI's ``command=``) pins the host key in the
test's own known_hosts, so nothing is added to the machine's. The backup socket and scratch
files live in the "remote" directory; the copier reads through the adapter's ssh tunnel,
never the remote socket itself. Full, then incremental; each point equals what the backup
export served, and the tunnel carried the same bytes as the socket it forwards.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from appliance.datapath.hashing import hash_export
from appliance.datapath.writer import QemuNbd
from appliance.replication import sync_disks
from appliance.sources.libvirt import LibvirtSource
from tests.datapath_fixtures import *  # noqa: F403
from tests.datapath_fixtures import MiB, check_ok
from tests.helpers.daemon import running_daemon
from tests.helpers.nbdsrc import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def loopback_sshd(root: Path) -> Iterator[str]:
    """An sshd for root on 127.0.0.1 with its own keys; yields the qemu+ssh:// URI."""
    if not Path("/usr/sbin/sshd").exists():
        pytest.fail("needs openssh-server (scripts/test installs it)")
    port = _port()
    root.mkdir(mode=0o700)
    hk, ck = root / "host_key", root / "client_key"
    for k in (hk, ck):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k)], check=True)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    pub = (root / "host_key.pub").read_text().split()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
    wrapper = root / "ssh"
    wrapper.write_text(
        "#!/bin/sh\nexec ssh -F none -o StrictHostKeyChecking=yes "
        f"-o UserKnownHostsFile={root}/known_hosts -o GlobalKnownHostsFile=/dev/null "
        '"$@"\n'
    )
    wrapper.chmod(0o755)
    cfg = root / "sshd_config"
    cfg.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {hk}\nPidFile {root}/sshd.pid\n"
        f"AuthorizedKeysFile {root}/authorized_keys\nStrictModes no\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n"
        "PermitRootLogin prohibit-password\nAllowUsers root\nAllowStreamLocalForwarding yes\n"
        "X11Forwarding no\nPrintMotd no\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege separation directory
    log = open(root / "sshd.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], stderr=log)
    try:
        end = time.monotonic() + 15
        while time.monotonic() < end:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.1)
        else:
            pytest.fail(f"sshd did not listen: {(root / 'sshd.log').read_text()[-1000:]}")
        yield f"qemu+ssh://root@127.0.0.1:{port}/system?keyfile={ck}&command={wrapper}"
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def _point_hash(chain, name, sock):
    with QemuNbd(chain.path_of(name), sock, read_only=True) as rd:
        return hash_export(rd.uri)


def _tunnel_pids(local: Path) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                if f"{local}:".encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
    return out


def _sync(src, guest, chain, name, sock, token):
    session = src.open_session(guest.uuid, token)
    try:
        uri = session.disks[0].nbd_uri
        local = Path(uri.split("socket=", 1)[1])
        # The data path is the tunnel: a local socket of ours, forwarding the remote one.
        assert local.parent == src.run_dir and local.name.endswith(".tunnel.sock"), uri
        assert session.socket.parent == src.remote_dir and session.socket.is_socket()
        assert _tunnel_pids(local), "no ssh tunnel process for the backup socket"
        res = sync_disks(session, {"vda": chain}, point_name=name, socket_dir=sock)
        served = hash_export(uri)  # through the tunnel, while the job still runs
        direct = hash_export(f"nbd+unix:///vda?socket={session.socket}")
        assert served.digest() == direct.digest()
        tok = session.token()
    finally:
        session.release()
    assert not local.exists() and not _tunnel_pids(local)  # the tunnel ends with the job
    assert not any(session.socket.parent.glob("*.scratch.qcow2"))
    return session, res[0], served, tok


def test_libvirt_over_qemu_ssh_full_then_incremental(
    tiny_guest, make_chain, dp_dir, dp_sock_dir, fm_env
):
    g = tiny_guest(64 * MiB, [(16 * MiB, 8 * MiB, 1), (40 * MiB, 2 * MiB, 2)])
    with loopback_sshd(dp_dir / "sshd") as uri:
        remote = dp_dir / "remote"
        src = LibvirtSource(uri, run_dir=dp_sock_dir / "backup", remote_dir=str(remote))
        src.test()
        assert src.conn().getURI().startswith("qemu+ssh://")
        m = {x.ref: x for x in src.discover()}[g.uuid]
        assert [d.key for d in m.disks] == ["vda"] and m.details["uri"] == uri
        g.wait_ready()
        chain = make_chain("vda")
        s1, r1, served1, tok1 = _sync(src, g, chain, "p1", dp_sock_dir, None)
        assert s1.full and r1.mode == "full" and r1.stats.bytes_read >= 10 * MiB
        assert oct(remote.stat().st_mode & 0o7777) == "0o1777"
        assert _point_hash(chain, "p1", dp_sock_dir).digest() == served1.digest()
        assert check_ok(chain.path_of("p1")) in (0, 3)
        assert g.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE

        time.sleep(3)  # the guest keeps writing 64 KiB blocks into its first 16 MiB
        s2, r2, served2, _ = _sync(src, g, chain, "p2", dp_sock_dir, tok1)
        assert not s2.full and r2.mode == "dirty"
        assert 0 < r2.stats.bytes_read <= 16 * MiB
        assert _point_hash(chain, "p2", dp_sock_dir).digest() == served2.digest()
        assert served2.digest() != served1.digest()
        assert check_ok(chain.path_of("p2")) in (0, 3)
        assert g.dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE
        src.conn().close()

        # The same host through ferrymand: source, discovery, a full and an incremental sync;
        # the engine itself compares each point with the still-frozen source (verify every
        # sync) and records the consistency it got.
        with running_daemon(fm_env, "--no-probe"):
            cli(fm_env, "source", "add", "kvm2", "--kind", "libvirt", "--uri", uri,
                "--param", f"remote_dir={remote}")  # fmt: skip
            assert cli(fm_env, "discover", "kvm2", "--wait")["state"] == "succeeded"
            cli(fm_env, "protect", g.name, "--verify-every-sync")
            for n in (1, 2):
                time.sleep(2)  # let the guest write between the two
                j = cli(fm_env, "sync", g.name, "--wait")
                assert j["state"] == "succeeded", j
                res = j["result"]
                assert res["full"] is (n == 1) and res["verified"] == "ok", res
                assert res["consistency"] == "crash-consistent" and res["bytes_read"] > 0
            events = [e["message"] for e in cli(fm_env, "events", "--limit", "200")]
            assert any("not quiesced: the guest agent did not answer" in e for e in events)
            points = cli(fm_env, "points", g.name)
            assert [p["verified"] for p in points] == ["ok", "ok"]
            for p in points:
                assert check_ok(Path(p["disks"][0]["path"])) in (0, 3)
        run = Path(fm_env.vars()["FERRYMAN_RUN_DIR"]) / "backup"
        assert not list(run.glob("*.tunnel.*"))  # tunnels (and their logs) end with the jobs
        assert not list(remote.glob("*.scratch.qcow2"))
