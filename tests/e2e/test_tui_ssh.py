"""The TUI in a real terminal, as a field engineer meets it: tmux running ssh into a loopback
sshd whose ForceCommand is the TUI, for a dedicated operator account.

Everything is the test's own: an sshd with its own config on a free 127.0.0.1 port, a
throw-away host key and client key, an account created here (in the ferryman groups, so the
daemon gives it the operator role) and removed afterwards, a tmux server on its own socket.
The screen is read with capture-pane. The test then quits the TUI and checks that the sync
it started was neither cancelled nor lost, and that the audit names the account and the SSH
origin the daemon read from the kernel and the session.
"""

from __future__ import annotations

import contextlib
import grp
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.client import Client
from tests.helpers.daemon import Env, running_daemon
from tests.tui.seed import normalise_daemon_rows, seed

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
BIN = Path(sys.executable).parent
SCREEN_WAIT_S = 40.0


def need(cond: bool, why: str) -> None:
    if not cond:
        pytest.fail(why)  # a missing part is a failure, never a skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=60)


@contextlib.contextmanager
def operator_account(groups: list[str]) -> Iterator[str]:
    user = f"fmtui{secrets.token_hex(3)}"
    extra = ["-G", ",".join(groups)] if groups else []
    run("useradd", "-m", "-s", "/bin/sh", *extra, user)
    try:
        run("usermod", "-p", "*", user)  # no password, but not locked: key login works
        yield user
    finally:
        run("pkill", "-KILL", "-u", user, check=False)  # its own processes only
        run("userdel", "-r", user, check=False)


@contextlib.contextmanager
def sshd(root: Path, user: str, command: str) -> Iterator[tuple[int, Path]]:
    port = free_port()
    host_key, client_key = root / "host_ed25519", root / "client_ed25519"
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key))
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(client_key))
    keys = root / "authorized_keys"
    keys.write_text((root / "client_ed25519.pub").read_text())
    keys.chmod(0o644)
    cfg = root / "sshd_config"
    cfg.write_text(
        f"ListenAddress 127.0.0.1\nPort {port}\nHostKey {host_key}\nPidFile {root}/sshd.pid\n"
        f"AuthorizedKeysFile {keys}\nStrictModes no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nPermitRootLogin no\n"
        f"AllowUsers {user}\nX11Forwarding no\nAllowTcpForwarding no\nPrintMotd no\n"
        f"Match User {user}\n    ForceCommand {command}\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    with open(root / "sshd.log", "w") as log:
        proc = subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=log
        )
        try:
            end = time.monotonic() + 10
            while time.monotonic() < end:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        break
                time.sleep(0.1)
            yield port, client_key
        finally:
            proc.terminate()
            proc.wait(10)


class Tmux:
    def __init__(self, name: str) -> None:
        self.base = ["tmux", "-L", name]

    def start(self, cmd: str, width: int, height: int) -> None:
        run(
            *self.base,
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "e2e",
            "-x",
            str(width),
            "-y",
            str(height),
            cmd,
        )

    def screen(self) -> str:
        return run(*self.base, "capture-pane", "-p", "-t", "e2e", check=False).stdout

    def keys(self, *keys: str) -> None:
        run(*self.base, "send-keys", "-t", "e2e", *keys)

    def wait_for(self, *texts: str, timeout: float = SCREEN_WAIT_S) -> str:
        end = time.monotonic() + timeout
        shown = ""
        while time.monotonic() < end:
            shown = self.screen()
            if all(t in shown for t in texts):
                return shown
            time.sleep(0.3)
        raise AssertionError(f"never saw {texts} on the screen; last screen:\n{shown}")

    def alive(self) -> bool:
        return run(*self.base, "has-session", "-t", "e2e", check=False).returncode == 0

    def kill(self) -> None:
        run(*self.base, "kill-server", check=False)


def test_tui_over_ssh_in_tmux() -> None:
    need(os.geteuid() == 0, "creates an account and starts sshd: needs root")
    need(
        all(shutil.which(t) for t in ("tmux", "ssh", "ssh-keygen", "useradd"))
        and Path("/usr/sbin/sshd").exists(),
        "needs tmux, openssh-server and -client",
    )
    groups = [g for g in ("ferryman", "ferryman-operator") if _group(g)]
    need("ferryman-operator" in groups, "the ferryman groups come from scripts/setup")
    root = Path(f"/tmp/fm-e2e-{secrets.token_hex(4)}")
    root.mkdir(mode=0o755)
    env = Env(root)
    # ferrymand runs with umask 077; the socket's directory must let the ferryman group in
    # (the appliance's unit creates /run/ferryman so); the store stays root's.
    env.socket.parent.mkdir(mode=0o750)
    os.chown(env.socket.parent, 0, grp.getgrnam("ferryman").gr_gid)
    tmux = Tmux(f"fm-e2e-{os.getpid()}")
    try:
        with running_daemon(env, "--no-probe", "--scheduler-tick", "86400"):
            seed(env.db, running_sync=False)
            normalise_daemon_rows(env.db)
            vars_ = " ".join(f"{k}={v}" for k, v in env.vars().items())
            command = f"/usr/bin/env TERM=xterm-256color {vars_} {BIN / 'ferryman'}"
            (root / "ssh").mkdir(mode=0o755)  # the account reads authorized_keys here
            with (
                operator_account(groups) as user,
                sshd(root / "ssh", user, command) as (
                    port,
                    key,
                ),
            ):
                tmux.start(
                    f"ssh -tt -i {key} -p {port} -o StrictHostKeyChecking=no "
                    f"-o UserKnownHostsFile=/dev/null -o LogLevel=ERROR "
                    f"{user}@127.0.0.1",
                    80,
                    24,
                )
                # the seed is dated; with the real clock every point is old: OVER, in words
                shown = tmux.wait_for("1 Dash", "app01", "✗ 3 failed", "✗ OVER")
                assert "db01" in shown and "web01" in shown and "Quit" in shown
                assert "ALERT" in shown and "discovery on vc01" in shown

                tmux.keys("7")
                tmux.wait_for("Audit", "discovery on vc01")
                tmux.keys("1")
                tmux.wait_for("ACTIVE JOBS")
                tmux.keys("Down", "Down", "Down")  # web01, the last row
                tmux.keys("s")
                shown = tmux.wait_for("sync of web01 started")
                tmux.keys("q")
                end = time.monotonic() + 20
                while tmux.alive() and time.monotonic() < end:
                    time.sleep(0.3)
                assert not tmux.alive(), "q ends the TUI and the SSH session"

            with Client(env.socket, user="test") as c:
                syncs = [j for j in c.jobs(limit=20) if j["kind"] == "sync"]
                assert syncs[0]["requested_by"] == user and syncs[0]["origin"] == "ssh:127.0.0.1"
                assert syncs, "the job the TUI started is in the daemon"
                assert syncs[0]["state"] != "cancelled", "quitting the TUI did not cancel it"
                mine = [a for a in c.audit() if a["who"] == user]
                assert mine, "the audit names the account the kernel reported"
                assert [a["action"] for a in mine] == ["login"], mine
                assert {a["origin"] for a in mine} == {"ssh:127.0.0.1"}, mine
    finally:
        tmux.kill()
        shutil.rmtree(root, ignore_errors=True)


def _group(name: str) -> bool:
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False
