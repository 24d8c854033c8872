"""Editing a source in place through ferrymand (PATCH /v1/sources/NAME) and the CLI
(`ferryman source edit`): bad fields are named one per line and nothing changes; a good
edit is tested against the real endpoint first, audited, its login encrypted again; a new
endpoint asks again for the certificate (vSphere) or SSH host key (agent) confirmation."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client import Client
from appliance.sources.agent.ssh import HostKey
from store.db import open_readonly
from store.secrets import KEY_NAME, Vault
from tests.datapath_fixtures import NbdkitServer
from tests.helpers.daemon import Daemon, Env, run_cli
from tests.helpers.nbdsrc import cli
from tests.helpers.tls import self_signed_tls

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def refused(env: Env, *args: str) -> str:
    r = run_cli(env, *args)
    assert r.returncode == 1, f"{args} was accepted: {r.stdout}"
    return r.stderr


def audit_of(env: Env, action: str) -> list[dict[str, str]]:
    return [a for a in cli(env, "audit-log", "--limit", "100") if a["action"] == action]


@pytest.fixture
def two_exports(tmp_path: Path) -> Iterator[tuple[NbdkitServer, NbdkitServer]]:
    a = NbdkitServer(tmp_path, ["memory", "16M"], name="edit-a").start()
    b = NbdkitServer(tmp_path, ["memory", "32M"], name="edit-b").start()
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_edit_names_every_bad_field_then_renames_throttles_and_moves(
    daemon: Daemon, fm_env: Env, two_exports: tuple[NbdkitServer, NbdkitServer]
) -> None:
    a, b = two_exports
    cli(fm_env, "source", "add", "lab", "--kind", "nbd", "--uri", a.uri)
    before = cli(fm_env, "sources")

    err = refused(
        fm_env,
        "source",
        "edit",
        "lab",
        "--rename",
        "bad name",
        "--uri",
        "https://10.0.0.1/",
        "--throttle",
        "1KiB",
        "--thumbprint",
        "ab" * 32,
    )
    lines = err.strip().splitlines()
    assert "source 'lab' was not changed; 4 fields are wrong:" in lines[0]
    assert [ln.split(":")[0].strip() for ln in lines[1:5]] == [
        "name",
        "uri",
        "throttle",
        "thumbprint",
    ]
    assert "it must start with nbd://" in lines[2] and "at least 65536" in lines[3]
    assert "nothing was sent or saved" in err
    r = run_cli(fm_env, "source", "edit", "lab", "--throttle", "fast")
    assert r.returncode == 2 and "'fast' is not a rate" in r.stderr  # argparse: wrong type
    # the API itself answers a wrong type with one line per field too
    with Client(fm_env.socket, user="test") as c:
        with pytest.raises(Exception) as e:
            c._call("PATCH", "/v1/sources/lab", json={"throttle_bps": "fast", "insecure": "x"})
        assert "throttle_bps:" in str(e.value) and "insecure:" in str(e.value)
    unreachable = f"nbd+unix:///?socket={a.sock}.gone"
    err = refused(fm_env, "source", "edit", "lab", "--uri", unreachable)
    assert f"cannot open NBD export {unreachable}" in err  # the daemon tested the new address
    assert cli(fm_env, "sources") == before, "a refused edit changes nothing"
    assert [x["result"][:8] for x in audit_of(fm_env, "source.edit")] == ["refused:"] * 2

    out = cli(fm_env, "source", "edit", "lab", "--rename", "lab2", "--throttle", "50MiB")
    assert out["name"] == "lab2" and out["params"]["throttle_bps"] == 50 * 1024**2
    assert out["changed"] == ["name", "throttle"] and out["endpoint_changed"] is False
    out = cli(fm_env, "source", "edit", "lab2", "--uri", b.uri)  # tested on the new export
    assert out["uri"] == b.uri and out["endpoint_changed"] is False  # the same unix scheme
    cli(fm_env, "discover", "lab2", "--wait")
    [m] = cli(fm_env, "machines")
    assert m["source"] == "lab2" and m["size"] == 32 * 1024**2, "the new export is read"
    out = cli(fm_env, "source", "edit", "lab2", "--no-throttle")
    assert "throttle_bps" not in out["params"]
    audit = audit_of(fm_env, "source.edit")
    assert audit[-3]["result"] == "changed: name, throttle"
    assert audit[-1]["result"] == "changed: throttle"
    events = [e["message"] for e in cli(fm_env, "events")]
    assert any("source lab2 edited by" in m and "throttle" in m for m in events)


def test_new_vsphere_endpoint_asks_for_its_certificate_and_login_is_encrypted_again(
    daemon: Daemon, fm_env: Env, tmp_path: Path
) -> None:
    pw = tmp_path / "pw"
    pw.write_text("first-secret\n")
    with (
        self_signed_tls(tmp_path / "a", "vc-a.local") as (port_a, fp_a),
        self_signed_tls(tmp_path / "b", "vc-b.local") as (port_b, fp_b),
    ):
        cli(
            fm_env,
            "source",
            "add",
            "vc",
            "--kind",
            "vsphere",
            "--uri",
            f"https://127.0.0.1:{port_a}/sdk",
            "--user",
            "administrator@vsphere.local",
            "--password-file",
            str(pw),
            "--thumbprint",
            fp_a,
            "--no-test",
        )
        db = open_readonly(fm_env.db)
        cred = db.execute("SELECT credential_id FROM sources WHERE name='vc'").fetchone()[0]
        old_token = db.execute("SELECT secret FROM credentials WHERE id=?", [cred]).fetchone()[0]

        err = refused(
            fm_env, "source", "edit", "vc", "--uri", f"https://127.0.0.1:{port_b}/sdk", "--no-test"
        )
        shown = ":".join(fp_b[i : i + 2] for i in range(0, 64, 2)).upper()
        assert f"SHA-256 {shown}" in err and f"--thumbprint {shown}" in err
        assert cli(fm_env, "sources")[0]["tls_thumbprint"] == fp_a, "the old pin stays"

        pw.write_text("second-secret\n")
        out = cli(
            fm_env,
            "source",
            "edit",
            "vc",
            "--uri",
            f"https://127.0.0.1:{port_b}/sdk",
            "--thumbprint",
            fp_b,
            "--password-file",
            str(pw),
            "--no-test",
        )
        assert out["endpoint_changed"] is True and out["tls_thumbprint"] == fp_b
        assert out["changed"] == ["uri", "thumbprint", "password"]
        assert "password" not in json.dumps(out).replace('"password"', "")
        new_cred = db.execute("SELECT credential_id FROM sources WHERE name='vc'").fetchone()[0]
        assert new_cred != cred
        assert db.execute("SELECT count(*) FROM credentials").fetchone()[0] == 1
        token = db.execute("SELECT secret FROM credentials WHERE id=?", [new_cred]).fetchone()[0]
        assert b"second-secret" not in bytes(token) and bytes(token) != bytes(old_token)
        vault = Vault(fm_env.db.parent / KEY_NAME)
        assert vault.get(db, new_cred) == ("administrator@vsphere.local", "second-secret")

        # a rename re-encrypts under the new label; the secret stays the same
        cli(fm_env, "source", "edit", "vc", "--rename", "vc-b", "--no-test")
        row = db.execute("SELECT credential_id FROM sources WHERE name='vc-b'").fetchone()
        label = db.execute("SELECT label FROM credentials WHERE id=?", [row[0]]).fetchone()[0]
        assert label == "source vc-b" and vault.get(db, row[0])[1] == "second-secret"
        # the daemon's own test of the edited source reaches the endpoint (it is no vCenter)
        err = refused(fm_env, "source", "edit", "vc-b", "--user", "root")
        assert cli(fm_env, "sources")[0]["name"] == "vc-b"
        db.conn.close()
    audit = audit_of(fm_env, "source.edit")
    assert [a["result"].split(":")[0] for a in audit] == [
        "refused",
        "changed",
        "changed",
        "refused",
    ]
    assert all("second-secret" not in a["params"] for a in audit)
    assert "***" in audit[1]["params"]


@pytest.fixture
def two_sshd(tmp_path: Path) -> Iterator[list[tuple[int, str]]]:
    """Two throw-away sshd on free loopback ports, each with its own host key."""
    if not Path("/usr/sbin/sshd").exists() or not shutil.which("ssh-keyscan"):
        pytest.fail("needs openssh-server and ssh-keyscan (scripts/setup installs them)")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    procs, out = [], []
    try:
        for i in range(2):
            d = tmp_path / f"sshd{i}"
            d.mkdir()
            key = d / "host_ed25519"
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            cfg = d / "sshd_config"
            cfg.write_text(
                f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {key}\nPidFile {d}/pid\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            )
            procs.append(
                subprocess.Popen(
                    ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            end = time.monotonic() + 10
            while time.monotonic() < end:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.1)
            line = " ".join(key.with_suffix(".pub").read_text().split()[:2])
            out.append((port, line))
        yield out
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def test_new_agent_host_asks_for_its_ssh_host_key(
    daemon: Daemon, fm_env: Env, two_sshd: list[tuple[int, str]], tmp_path: Path
) -> None:
    (port_a, key_a), (port_b, key_b) = two_sshd
    ident = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(ident)], check=True)
    cli(
        fm_env,
        "source",
        "add",
        "agent1",
        "--kind",
        "linux-agent",
        "--uri",
        f"ssh://root@127.0.0.1:{port_a}",
        "--password-file",
        str(ident),
        "--param",
        f"host_key={key_a}",
        "--no-test",
    )
    err = refused(
        fm_env, "source", "edit", "agent1", "--uri", f"ssh://root@127.0.0.1:{port_b}", "--no-test"
    )
    fp_a, fp_b = HostKey.parse(key_a).fingerprint, HostKey.parse(key_b).fingerprint
    assert f"127.0.0.1:{port_b} presents SSH host key {fp_b}" in err
    assert f"--param host_key={fp_b}" in err
    assert cli(fm_env, "sources")[0]["params"]["host_key"] == key_a
    move = ("source", "edit", "agent1", "--uri", f"ssh://root@127.0.0.1:{port_b}", "--no-test")
    # A confirmed fingerprint that is not the one the new server presents: refused.
    err = refused(fm_env, *move, "--param", f"host_key={fp_a}")
    assert fp_b in err and fp_a in err
    assert cli(fm_env, "sources")[0]["params"]["host_key"] == key_a
    # The confirmed fingerprint pins the key line the server presents, as at `source add`.
    out = cli(fm_env, *move, "--param", f"host_key={fp_b}")
    assert out["params"]["host_key"] == key_b and out["endpoint_changed"] is True
