"""Reliability row 26: bad plan JSON (wrong types, unknown machine, cycle in dependencies,
duplicate IPs, ...) is refused with the JSON path and the fix; nothing is half applied.

Each file of bad_plans/ is saved over a good version 1 of the same plan through a real
ferrymand: the API answers 422 naming the expected path with a fix, the CLI's validate exits 1
with the same path, and the stored plan is still exactly version 1.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from appliance.units import MiB
from tests.helpers.daemon import Env
from tests.integration.test_plans_daemon import NbdExport, PlansDaemon, plan_cli

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(600)]

CORPUS = Path(__file__).with_name("bad_plans")
EXPECTED: dict[str, str] = json.loads((CORPUS / "expected.json").read_text())
GOOD = {
    "format": 1,
    "name": "shop",
    "networks": [{"name": "lan", "mode": "isolated", "subnet": "10.10.0.0/24"}],
    "machines": [
        {"machine": "db", "rank": 1, "nics": [{"network": "lan", "address": "10.10.0.5/24"}]},
        {"machine": "app", "rank": 2, "depends_on": ["db"]},
    ],
}


@pytest.fixture(scope="module")
def env_with_machines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("row26")
    env = Env(root)
    old = {k: os.environ.get(k) for k in env.vars()}
    os.environ.update(env.vars())
    exports = []
    daemon = PlansDaemon(env)
    try:
        with env.client() as c:
            for name in ("db", "app"):
                img = root / f"{name}.raw"
                with open(img, "wb") as f:
                    f.truncate(8 * MiB)
                exp = NbdExport(img, root / f"{name}.sock")
                exports.append(exp)
                c.add_source(f"src-{name}", "nbd", exp.uri, params={"name": name})
                assert c.wait(c.discover(f"src-{name}")["id"], timeout=60)["state"] == "succeeded"
            assert c.save_plan("shop", GOOD)["version"] == 1
        yield env
    finally:
        daemon.stop()
        for exp in exports:
            exp.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_corpus_is_complete() -> None:
    files = {p.stem for p in CORPUS.glob("*.json")} - {"expected"}
    assert files == set(EXPECTED)
    assert len(files) >= 20


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_plan_refused_with_path_and_fix(env_with_machines: Env, case: str) -> None:
    env = env_with_machines
    doc = json.loads((CORPUS / f"{case}.json").read_text())
    want = EXPECTED[case]
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(env.socket))) as h:
        r = h.put("http://ferrymand/v1/plans/shop", json={"document": doc})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["code"] == "plan.invalid"
    assert want in body["message"], body["message"]
    paths = {p["path"]: p for p in body["problems"]}
    assert want in paths, body["problems"]
    assert paths[want]["fix"] and paths[want]["message"]
    assert "\n" not in body["message"]
    # The CLI says the same, exit 1.
    f = env.root / f"{case}.json"
    f.write_text(json.dumps(doc))
    cli = plan_cli(env, "plan", "validate", str(f))
    assert cli.returncode == 1 and f"{want}:" in cli.stdout and "fix:" in cli.stdout
    # Nothing half applied: version 1 is still the newest, unchanged.
    with env.client() as c:
        p = c.plan("shop")
    assert p["version"] == 1 and p["document"] == GOOD
