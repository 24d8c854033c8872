"""Plans through a real ferrymand: save/validate/diff over the API and the CLI, and test runs
of a real libvirt domain (TCG) that must fail their readiness, be cancelled while replication
goes on, or lose their daemon to kill -9.

The other plan test modules import the helpers defined here (a daemon that can be killed and
restarted on one store, the CLI, an NBD export, replication of a machine, leftover checks).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.units import MiB
from tests.helpers.daemon import BIN, Env
from tests.helpers.evidence import check_pack


class PlansDaemon:
    """ferrymand (with the plans wiring) on a test store; stopped or killed by its PID."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.proc = subprocess.Popen(
            [str(BIN / "ferrymand"), "--log-file", str(env.log), "--no-probe"],
            env=env.environ(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.wait_ready()

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ferrymand exited {self.proc.returncode}")
            if self.env.socket.exists():
                try:
                    with self.env.client() as c:
                        c.health()
                    return
                except Exception:
                    pass
            time.sleep(0.1)
        raise TimeoutError("ferrymand did not answer")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def plans_daemon(fm_env: Env) -> Iterator[PlansDaemon]:
    d = PlansDaemon(fm_env)
    try:
        yield d
    finally:
        d.stop()


def plan_cli(env: Env, *args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ferryman"), *args],
        env=env.environ(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_json(env: Env, *args: str, ok: bool = True, timeout: float = 900) -> Any:
    r = plan_cli(env, *args, "--json", timeout=timeout)
    if ok:
        assert r.returncode == 0, f"{args}: {r.stdout} {r.stderr}"
    return json.loads(r.stdout)


class NbdExport:
    """qemu-nbd serving an image read-only on a unix socket; stopped by its PID."""

    def __init__(self, img: Path, sock: Path, fmt: str = "raw") -> None:
        self.img, self.sock = img, sock
        sock.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-f", fmt, "-r", "-t", "-k", str(sock), str(img)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            if sock.exists():
                return
            time.sleep(0.05)
        raise RuntimeError("qemu-nbd did not start")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def replicate(env: Env, source: str, uri: str, machine: str) -> dict[str, Any]:
    """Register an NBD source, discover its machine, protect it, sync once."""
    with env.client() as c:
        c.add_source(source, "nbd", uri, params={"name": machine})
        c.wait(c.discover(source)["id"], timeout=120)
        c.protect(machine)
        job = c.wait(c.sync(machine)["id"], timeout=600)
        assert job["state"] == "succeeded", job
        return c.restore_points(machine)[-1]  # type: ignore[no-any-return]


def libvirt_names(prefix: str) -> dict[str, list[str]]:
    import libvirt

    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open("qemu:///system")
    try:
        return {
            "domains": [d.name() for d in conn.listAllDomains(0) if d.name().startswith(prefix)],
            "networks": [n.name() for n in conn.listAllNetworks(0) if n.name().startswith(prefix)],
        }
    finally:
        conn.close()


def store_tag(env: Env) -> str:
    import sqlite3

    con = sqlite3.connect(env.db)
    try:
        row = con.execute("SELECT value FROM settings WHERE key='plans.instance'").fetchone()
    finally:
        con.close()
    return str(json.loads(row[0])) if row else "(no tag yet)"


def readers_left(env: Env) -> list[Path]:
    vol = env.root / "volumes"
    return [p for p in vol.rglob("readers/*/*.json")]


# -- tests ------------------------------------------------------------------------------------

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1800)]


@pytest.fixture
def blank_source(tmp_path: Path) -> Iterator[NbdExport]:
    img = tmp_path / "blank.raw"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
        f.seek(MiB)
        f.write(os.urandom(MiB))  # something to copy
    exp = NbdExport(img, tmp_path / "blank.sock")
    yield exp
    exp.stop()


def small_plan(name: str = "lab", **machine: Any) -> dict[str, Any]:
    m = {
        "machine": "web01",
        "rank": 1,
        "conversion": "none",
        "memory_mib": 256,
        "nics": [{"network": "lan", "mac": "new", "address": "10.231.0.10/24"}],
        **machine,
    }
    return {
        "format": 1,
        "name": name,
        "networks": [{"name": "lan", "mode": "isolated", "subnet": "10.231.0.0/24"}],
        "machines": [m],
    }


def test_plan_versions_validation_and_cli(
    plans_daemon: PlansDaemon, fm_env: Env, blank_source: NbdExport, tmp_path: Path
) -> None:
    replicate(fm_env, "lab", blank_source.uri, "web01")
    with fm_env.client() as c:
        # plan new from the protected machine
        doc = c.new_plan("lab")
        assert [m["machine"] for m in doc["machines"]] == ["web01"]
        assert c.validate_plan(doc) == {"ok": True, "problems": []}
        # invalid: refused with every problem, nothing stored
        bad = small_plan()
        bad["machines"][0]["cpus"] = "two"
        bad["machines"].append({"machine": "ghost", "rank": 1})
        v = c.validate_plan(bad)
        assert not v["ok"]
        assert {p["path"] for p in v["problems"]} == {"$.machines[0].cpus"}
        bad["machines"][0]["cpus"] = 2
        v = c.validate_plan(bad)
        paths = {p["path"]: p for p in v["problems"]}
        assert (
            "$.machines[1].machine" in paths
            and "ferryman machines" in paths["$.machines[1].machine"]["fix"]
        )
        with pytest.raises(Exception) as e:
            c.save_plan("lab", bad)
        assert "$.machines[1].machine" in str(e.value)
        assert c.plans() == []
        # versions: v1, unchanged, v2, diff
        good = small_plan()
        assert c.save_plan("lab", good)["version"] == 1
        again = c.save_plan("lab", good)
        assert again["version"] == 1 and again["unchanged"] is True
        good["machines"][0]["memory_mib"] = 512
        assert c.save_plan("lab", good)["version"] == 2
        d = c.plan_diff("lab")
        assert d["from"] == 1 and d["to"] == 2
        assert d["changes"] == ["machines: web01.memory_mib: 256 -> 512"]
        assert c.plan("lab", 1)["document"]["machines"][0]["memory_mib"] == 256
        audit = [a["action"] for a in c.audit()]
        assert audit.count("plan.save") == 4  # refused one included

    # the CLI: validate names path and fix, exit 1; save/list/diff with --json
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps({**small_plan(), "machines": [{"machine": "web01"}]}))
    r = plan_cli(fm_env, "plan", "validate", str(bad_file))
    assert r.returncode == 1
    assert "$.machines[0]: the key 'rank' is missing" in r.stdout and "fix:" in r.stdout
    r = plan_cli(fm_env, "plan", "save", str(bad_file))
    assert r.returncode == 1 and "NOT saved" in r.stdout
    lst = cli_json(fm_env, "plan", "list")
    assert lst[0]["name"] == "lab" and lst[0]["version"] == 2
    diff = cli_json(fm_env, "plan", "diff", "lab", "--from", "1", "--to", "2")
    assert diff["changes"] == ["machines: web01.memory_mib: 256 -> 512"]
    new = cli_json(fm_env, "plan", "new", "fresh", "--machine", "web01")
    assert new["name"] == "fresh"


def test_readiness_never_reached_fails_naming_machine_and_check_and_cleans_up(
    plans_daemon: PlansDaemon, fm_env: Env, blank_source: NbdExport
) -> None:
    """A blank disk never boots: the console check times out; the run fails and leaves
    nothing behind (domain, network, overlay, reader, run directory)."""
    replicate(fm_env, "lab", blank_source.uri, "web01")
    plan = small_plan(
        checks=[{"type": "console", "pattern": "FERRYMAN-BOOT-OK", "timeout_s": 8}],
    )
    with fm_env.client() as c:
        c.save_plan("lab", plan)
        run = c.test_run("lab")
        assert run["state"] in ("queued", "running")
        done = c.wait_run(run["id"], until=("succeeded", "failed", "cancelled"), timeout=900)
        job = c.job(run["job"]["id"])
    assert done["state"] == "failed", done
    rep = done["report"]
    assert "machine 'web01' never passed its console /FERRYMAN-BOOT-OK/ check" in rep["error"]
    assert "timeout after 8 s" in rep["error"]
    assert job["state"] == "failed" and "web01" in job["error"]
    m = rep["machines"]["web01"]
    assert m["state"] == "failed"
    assert m["checks"][0]["passed"] is False and m["checks"][0]["type"] == "console"
    # The domain really ran: the boot phase was measured up to the failure.
    assert m["phases"]["convert_s"] is not None and m["phases"]["boot_s"] is None
    c_up = rep["cleanup"]
    assert c_up["ok"] is True, c_up
    assert len(c_up["domains"]) == 1 and len(c_up["networks"]) == 1
    assert c_up["overlays"] == 1 and c_up["readers"] == 1
    tag = store_tag(fm_env)
    assert libvirt_names(f"fm-{tag}-") == {"domains": [], "networks": []}
    assert not (fm_env.root / "volumes" / "plan-runs" / f"run-{run['id']}").exists()
    assert readers_left(fm_env) == []
    # exported: JSON + text beside the console log
    out = Path(rep["export_dir"])
    assert json.loads((out / "report.json").read_text())["state"] == "failed"
    text = (out / "report.txt").read_text()
    assert "FAIL console /FERRYMAN-BOOT-OK/" in text and "clean-up: complete" in text
    assert (out / "web01.console.log").exists()
    # the signed evidence pack: the failure, its phases, the disk that booted, who started it
    assert json.loads((out / "report.json").read_text())["report"]["evidence"]["file"]
    pack = check_pack(fm_env, run["id"], fm_env.root, outcome="failed", source=blank_source.img)
    assert "never passed its console" in pack["summary"]["error"]
    assert pack["rto"]["machines"]["web01"]["boot_s"] is None
    assert pack["run"]["cleanup"]["ok"] is True
    assert pack["rpo"]["machines"]["web01"]["restore_point"] == m["restore_point"]["id"]
    assert [a["action"] for a in pack["operator_actions"]["actions"]] == ["testrun.start"]


def test_daemon_killed_during_a_test_run_is_cleaned_at_restart(
    fm_env: Env, blank_source: NbdExport
) -> None:
    d = PlansDaemon(fm_env)
    try:
        replicate(fm_env, "lab", blank_source.uri, "web01")
        plan = small_plan(checks=[{"type": "delay", "seconds": 600}])
        with fm_env.client() as c:
            c.save_plan("lab", plan)
            run = c.test_run("lab")
            end = time.monotonic() + 120
            while time.monotonic() < end:
                r = c.test_run_show(run["id"])
                if r["report"].get("resources", {}).get("domains"):
                    break
                time.sleep(0.5)
        tag = store_tag(fm_env)
        end = time.monotonic() + 900  # libvirt takes 1-5 min to start a domain on this loaded host
        while time.monotonic() < end:
            live = libvirt_names(f"fm-{tag}-t{run['id']}-")
            if live["domains"]:
                break
            time.sleep(1)
        assert live["domains"] and live["networks"], live
        assert readers_left(fm_env)
        d.kill9()
        # The domain outlives the daemon...
        assert libvirt_names(f"fm-{tag}-t{run['id']}-")["domains"]
    finally:
        d.stop()
    d = PlansDaemon(fm_env)  # ...until the next start cleans it up
    try:
        with fm_env.client() as c:
            r = c.test_run_show(run["id"])
            job = c.job(run["job"]["id"])
            events = [e["message"] for e in c.events()]
        check_pack(fm_env, run["id"], fm_env.root, outcome="interrupted")
    finally:
        d.stop()
    assert r["state"] == "interrupted", r
    assert "ferrymand stopped while the test run" in r["report"]["error"]
    assert r["report"]["cleanup"]["ok"] is True
    assert job["state"] == "interrupted"
    assert any("interrupted by a daemon restart" in e for e in events)
    assert libvirt_names(f"fm-{tag}-") == {"domains": [], "networks": []}
    assert readers_left(fm_env) == []
    assert not (fm_env.root / "volumes" / "plan-runs" / f"run-{run['id']}").exists()


def test_replication_continues_during_a_test_run_then_cancel_cleans_up(
    plans_daemon: PlansDaemon, fm_env: Env, blank_source: NbdExport
) -> None:
    first = replicate(fm_env, "lab", blank_source.uri, "web01")
    with fm_env.client() as c:
        c.save_plan("lab", small_plan(checks=[{"type": "delay", "seconds": 900}]))
        run = c.test_run("lab")
        end = time.monotonic() + 900
        while time.monotonic() < end:
            r = c.test_run_show(run["id"])
            if any(m.get("state") == "booting" for m in r["report"].get("machines", {}).values()):
                break
            time.sleep(1)
        else:
            pytest.fail(f"the test run never booted: {r}")
        assert r["report"]["machines"]["web01"]["restore_point"]["id"] == first["id"]
        # A sync of the machine under test runs meanwhile and makes a new restore point.
        job = c.wait(c.sync("web01")["id"], timeout=900)
        assert job["state"] == "succeeded", job
        assert c.restore_points("web01")[-1]["id"] > first["id"]
        assert c.test_run_show(run["id"])["state"] == "running"
        c.test_run_cancel(run["id"])
        done = c.wait_run(run["id"], until=("succeeded", "failed", "cancelled"), timeout=900)
    assert done["state"] == "cancelled", done
    assert done["report"]["cleanup"]["ok"] is True
    check_pack(fm_env, run["id"], fm_env.root, outcome="cancelled")
    assert libvirt_names(f"fm-{store_tag(fm_env)}-") == {"domains": [], "networks": []}
    assert readers_left(fm_env) == []
