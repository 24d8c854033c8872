"""Inspect, preflight and convert a restore point through ferrymand and the CLI.

The source is the cached vmware-like guest served by qemu-nbd; after a sync its restore
point is inspected (stored with the point), passes preflight, and is converted onto a new
overlay whose backing file is the sealed point, which stays untouched."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest

from tests.helpers.daemon import Daemon, Env
from tests.helpers.nbdsrc import Export, cli

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(1800)]


def test_inspect_preflight_convert_a_restore_point(
    daemon: Daemon, fm_env: Env, vmware_like_image: Path, tmp_path: Path
) -> None:
    exp = Export(vmware_like_image, tmp_path / "src.sock", fmt="qcow2")
    exp.start()
    try:
        cli(
            fm_env,
            "source",
            "add",
            "lab",
            "--kind",
            "nbd",
            "--uri",
            exp.uri,
            "--param",
            "name=web01",
        )
        cli(fm_env, "discover", "lab", "--wait")
        cli(fm_env, "protect", "web01")
        cli(fm_env, "sync", "web01", "--wait")
    finally:
        exp.stop()
    rp = cli(fm_env, "points", "web01")[-1]
    point = Path(rp["disks"][0]["path"])
    before = hashlib.sha256(point.read_bytes()).hexdigest()

    data = cli(fm_env, "inspect", str(rp["id"]))
    assert data["inspection"]["os_type"] == "linux" and data["preflight"]["ok"] is True
    stored = cli(fm_env, "points", "web01")[-1]["inspection"]
    assert stored["inspection"]["distro"] == data["inspection"]["distro"]
    pf = cli(fm_env, "preflight", "web01", str(rp["id"]))
    assert pf["preflight"]["ok"] is True

    out = tmp_path / "web01-converted.qcow2"
    job = cli(fm_env, "convert", str(rp["id"]), "--to", str(out), "--wait")
    assert job["state"] == "succeeded", job
    assert job["result"]["backend"] == "builtin"
    info = json.loads(
        subprocess.run(
            ["qemu-img", "info", "--output=json", "-U", str(out)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert Path(info["full-backing-filename"]).resolve() == point.resolve()
    assert hashlib.sha256(point.read_bytes()).hexdigest() == before  # the chain only read
