"""Cutover needs two operators: operator A opens a cutover, a different account approves it by
typing the plan's name; A cannot approve their own request, a viewer cannot approve, a wrong
name is refused; every request, approval and refusal is in the audit trail.

Real accounts (useradd), the real CLI run as each of them (runuser), a real ferrymand with an
NBD source replicated once and libvirt for the preflight."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.units import MiB
from tests.helpers.daemon import Env, run_cli, running_daemon
from tests.integration.test_plans_cutover import plan, settle
from tests.integration.test_plans_daemon import NbdExport, replicate
from tests.integration.test_roles import as_user
from tests.integration.test_roles import shared_env as shared_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture
def people() -> Iterator[dict[str, str]]:
    tag = uuid.uuid4().hex[:6]
    users = {"a": f"fma{tag}", "b": f"fmb{tag}", "viewer": f"fmv{tag}"}
    for key, name in users.items():
        groups = "ferryman" if key == "viewer" else "ferryman,ferryman-operator"
        subprocess.run(["useradd", "-M", "-G", groups, name], check=True)
    try:
        yield users
    finally:
        for name in users.values():
            subprocess.run(["userdel", name], check=False)


@pytest.fixture
def source(tmp_path: Path) -> Iterator[NbdExport]:
    img = tmp_path / "src.raw"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(MiB)
        f.write(os.urandom(MiB))
    exp = NbdExport(img, tmp_path / "src.sock")
    yield exp
    exp.stop()


def ok(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert r.returncode == 0, r.stdout + r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def refused(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert r.returncode == 1, r.stdout + r.stderr
    return json.loads(r.stdout)["error"]  # type: ignore[no-any-return]


def test_cutover_waits_for_a_second_operator(
    shared_env: Env, people: dict[str, str], source: NbdExport
) -> None:
    a, b, v = people["a"], people["b"], people["viewer"]
    with running_daemon(shared_env, "--no-probe"):
        replicate(shared_env, "lab", source.uri, "web01")
        with shared_env.client() as c:
            c.save_plan("dr", plan("dr", "10.235.0.0/24"))
            c.set_machine("web01", rpo_seconds=7200)

        # Only an admin sets the policy.
        err = refused(as_user(shared_env, a, "cutover", "policy", "--two-operators", "on"))
        assert err["code"] == "forbidden" and "ferryman-admin" in err["hint"]
        assert ok(run_cli(shared_env, "cutover", "policy", "--two-operators", "on", "--json")) == {
            "two_operators": True
        }

        run = ok(as_user(shared_env, a, "cutover", "start", "dr"))
        rid = run["id"]
        assert run["approval"]["required"] is True and run["approval"]["requested_by"] == a
        assert run["confirm"] is None and run["next"] == "final-delta"
        assert f"not {a}" in run["waiting_for"]

        err = refused(as_user(shared_env, a, "cutover", "confirm", str(rid), "final-delta"))
        assert "waits for approval by a second operator" in err["message"]
        err = refused(as_user(shared_env, a, "cutover", "approve", str(rid), "--confirm", "dr"))
        assert f"{a} requested cutover {rid}" in err["message"]
        assert "another operator" in err["message"]
        err = refused(as_user(shared_env, v, "cutover", "approve", str(rid), "--confirm", "dr"))
        assert err["code"] == "forbidden"
        err = refused(as_user(shared_env, b, "cutover", "approve", str(rid), "--confirm", "rd"))
        assert "does not match plan 'dr'" in err["message"]

        run = ok(as_user(shared_env, b, "cutover", "approve", str(rid), "--confirm", "dr"))
        assert run["approval"]["approved_by"] == b and run["approval"]["approved_at"]
        assert run["confirm"] == f"ferryman cutover confirm {rid} final-delta"
        assert "waiting_for" not in run
        err = refused(as_user(shared_env, b, "cutover", "approve", str(rid), "--confirm", "dr"))
        assert f"already approved by {b}" in err["message"]

        ok(as_user(shared_env, a, "cutover", "rollback", str(rid)))
        with shared_env.client() as c:
            assert settle(c, rid)["state"] == "rolled-back"

        # Policy off: a new cutover needs one operator.
        ok(run_cli(shared_env, "cutover", "policy", "--two-operators", "off", "--json"))
        run2 = ok(as_user(shared_env, a, "cutover", "start", "dr"))
        assert run2["approval"]["required"] is False and run2["confirm"]
        err = refused(
            as_user(shared_env, b, "cutover", "approve", str(run2["id"]), "--confirm", "dr")
        )
        assert "needs no approval" in err["message"]
        ok(as_user(shared_env, a, "cutover", "rollback", str(run2["id"])))
        with shared_env.client() as c:
            assert settle(c, run2["id"])["state"] == "rolled-back"

        audit = ok(run_cli(shared_env, "audit-log", "--limit", "500", "--json"))
        rows = [(x["who"], x["action"], x["result"]) for x in audit]

        def has(who: str, action: str, result: str) -> bool:
            return any(w == who and ac == action and r.startswith(result) for w, ac, r in rows)

        assert has("root", "cutover.policy", "ok")
        assert has(a, "change the cutover policy", "refused")
        assert has(a, "cutover.start", "ok")
        assert has(a, "cutover.confirm", "refused: cutover")
        assert has(a, "cutover.approve", f"refused: {a} requested")
        assert has(v, f"use /v1/cutovers/{rid}/approve", "refused")
        assert has(b, "cutover.approve", "refused: the confirmation 'rd'")
        assert has(b, "cutover.approve", "ok")
        verify = ok(run_cli(shared_env, "audit", "verify", "--json"))
        assert verify["ok"] is True
