"""Roles come from the kernel's peer credentials and the caller's groups, never from headers.

Real accounts, a real daemon, the real CLI run as those accounts (runuser)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import Env, running_daemon

pytestmark = pytest.mark.integration
FERRYMAN = str(Path(sys.executable).parent / "ferryman")


@pytest.fixture
def accounts() -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:6]
    users = {"viewer": f"fmv{tag}", "operator": f"fmo{tag}"}
    subprocess.run(["useradd", "-M", "-G", "ferryman", users["viewer"]], check=True)
    subprocess.run(
        ["useradd", "-M", "-G", "ferryman,ferryman-operator", users["operator"]], check=True
    )
    try:
        yield users
    finally:
        for u in users.values():
            subprocess.run(["userdel", u], check=False)


@pytest.fixture
def shared_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    """State under the test's tmp dir; the socket in a directory other users can reach."""
    env = Env(tmp_path)
    run = Path(f"/run/ferryman-test-{uuid.uuid4().hex[:8]}")
    run.mkdir(mode=0o755)
    monkeypatch.setattr(Env, "socket", property(lambda self: run / "ferrymand.sock"))
    for k, v in env.vars().items():
        monkeypatch.setenv(k, v)
    try:
        yield env
    finally:
        shutil.rmtree(run, ignore_errors=True)


def as_user(env: Env, user: str, *args: str) -> subprocess.CompletedProcess[str]:
    keep = ",".join(env.vars())
    return subprocess.run(
        ["runuser", "-u", user, f"--whitelist-environment={keep}", "--", FERRYMAN, *args, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, **env.vars()},
        timeout=60,
        cwd="/",
    )


def test_roles_by_group(shared_env: Env, accounts: dict[str, str]) -> None:
    with running_daemon(shared_env, "--no-probe"):
        assert (shared_env.socket.stat().st_mode & 0o777) == 0o660
        v, o = accounts["viewer"], accounts["operator"]
        r = as_user(shared_env, v, "jobs")
        assert r.returncode == 0, r.stdout + r.stderr  # viewing needs no role
        r = as_user(shared_env, v, "probe")
        assert r.returncode == 1
        err = json.loads(r.stdout)["error"]
        assert (
            err["code"] == "forbidden"
            and f"{v} (viewer) may not start a probe job" in err["message"]
            and "ferryman-operator" in err["hint"]
        )
        r = as_user(shared_env, o, "probe")
        assert r.returncode == 0, r.stdout + r.stderr
        r = as_user(
            shared_env,
            o,
            "source",
            "add",
            "x",
            "--kind",
            "nbd",
            "--uri",
            "nbd+unix:///?socket=/nonexistent",
            "--no-test",
        )
        assert json.loads(r.stdout)["error"]["code"] == "forbidden"  # admin only
        # The header a client sends does not make it someone else.
        with shared_env.client() as c:
            assert c.whoami() == {"user": "root", "role": "admin", "origin": "console"}
        audit = json.loads(
            subprocess.run(
                [FERRYMAN, "audit-log", "--json"],
                text=True,
                capture_output=True,
                env=shared_env.environ(),
            ).stdout
        )
        rows = [(a["who"], a["action"], a["result"].split(":")[0]) for a in audit]
        assert (o, "job.probe", "job 1") in rows
        assert (v, "start a probe job", "refused") in rows  # refusals are recorded too
