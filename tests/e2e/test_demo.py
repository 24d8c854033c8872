"""The README's first command, headless, from a clean clone: scripts/demo --headless.

It builds (or reuses from cache) the lab VM, protects it, and tells the whole story. The test
checks what a newcomer is promised: the first restore point equals the source snapshot (it
was compared block by block while the snapshot existed), a test run reports its RTO, a
cutover reports its downtime, and --reset leaves no domain, network or disk behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

from appliance.config import environment_under

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    dest = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    return dest


@pytest.fixture
def demo_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    base = Path(f"/var/tmp/ferryman-demo-test-{uuid.uuid4().hex[:6]}")
    base.mkdir(mode=0o755)
    env = {**os.environ, **environment_under(base)}
    yield env
    pid_file = base / "state" / "state.db.lock"
    if pid_file.exists():  # the demo starts ferrymand detached: stop that one, by its PID
        pid = int(pid_file.read_text().strip() or 0)
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    subprocess.run(["rm", "-rf", str(base)], check=False)


def lab_objects() -> list[str]:
    libvirt.registerErrorHandler(lambda _c, _e: None, None)
    conn = libvirt.open("qemu:///system")
    try:
        names = [d.name() for d in conn.listAllDomains()]
        names += [n.name() for n in conn.listAllNetworks()]
    finally:
        conn.close()
    return [n for n in names if "ferryman-lab" in n]


def test_demo_headless_story_then_reset(clone: Path, demo_env: dict[str, str]) -> None:
    r = subprocess.run(
        [str(clone / "scripts" / "demo"), "--headless"],
        env=demo_env,
        capture_output=True,
        text=True,
        timeout=3400,
    )
    out = r.stdout
    assert r.returncode == 0, out[-3000:] + r.stderr[-3000:]
    lines = out.splitlines()
    assert all(re.match(r"\[\s*\d+\.\d s \| \+\s*\d+\.\d s\] ", x) for x in lines), out
    first = next(x for x in lines if "first restore point" in x)
    assert "verified 'ok'" in first and "block for block" in first
    rto = re.search(r"test run \d+: RTO (\d+) s \(convert (\d+) s, boot (\d+) s", out)
    assert rto and int(rto.group(1)) > 0, out
    down = re.search(r"downtime (\d+) s", out)
    assert down and int(down.group(1)) > 0, out
    assert any("committed" in x for x in lines)

    vol = Path(demo_env["FERRYMAN_VOLUME_DIR"])
    assert any(vol.rglob("*.qcow2"))
    r = subprocess.run(
        [str(clone / "scripts" / "demo"), "--reset"],
        env=demo_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert lab_objects() == []
    assert not Path(demo_env["FERRYMAN_LAB_DIR"]).exists()
    assert list(vol.rglob("*.qcow2")) == [], list(vol.rglob("*.qcow2"))
    machines = subprocess.run(
        [str(clone / ".venv" / "bin" / "ferryman"), "machines", "--json"],
        env=demo_env,
        capture_output=True,
        text=True,
    )
    assert json.loads(machines.stdout) == []
