"""Rows 16 and 17: a sealed restore point rots (two bytes in a data cluster) or its qcow2
metadata is overwritten. `ferryman verify` must flag that point and every later one (they
read through it); nothing is repaired silently."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

from appliance.units import MiB
from tests.helpers.daemon import Daemon, Env, run_cli
from tests.helpers.nbdsrc import Export, cli, register, source, write_random

_ = source
pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]


def two_points(env: Env, src: Export) -> list[dict]:  # type: ignore[type-arg]
    register(env, src)
    cli(env, "sync", "web01", "--wait")
    src.stop()
    write_random(src.img, 30 * MiB, MiB, 9)
    src.start()
    cli(env, "sync", "web01", "--wait")
    rps = cli(env, "points", "web01")
    assert len(rps) == 2
    return rps  # type: ignore[no-any-return]


def verify_fails(env: Env, rp_id: int) -> str:
    r = run_cli(env, "verify", str(rp_id), "--wait", "--json", timeout=300)
    job = json.loads(r.stdout)
    assert r.returncode == 1 and job["state"] == "failed", job
    return str(job["error"])


def test_row_16_bit_rot_in_a_data_cluster(daemon: Daemon, fm_env: Env, source: Export) -> None:
    rps = two_points(fm_env, source)
    base = Path(rps[0]["disks"][0]["path"])
    # A data cluster of the base, from qemu-img map (host offsets of allocated data).
    m = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", "-U", str(base)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    data = next(e for e in m if e["data"] and e.get("offset") is not None and e["depth"] == 0)
    with open(base, "r+b") as f:
        f.seek(data["offset"] + 4096 + 17)
        old = f.read(2)
        f.seek(data["offset"] + 4096 + 17)
        f.write(bytes(b ^ 0xFF for b in old))
    err = verify_fails(fm_env, rps[0]["id"])
    assert f"restore point {rps[0]['id']} is damaged" in err and "blocks differ" in err
    after = {r["id"]: r["verified"] for r in cli(fm_env, "points", "web01")}
    assert after == {rps[0]["id"]: "mismatch", rps[1]["id"]: "mismatch"}
    ev = [e["message"] for e in cli(fm_env, "events", "--limit", "200")]
    assert any("FAILED verification" in e and "depend on it" in e for e in ev)


def test_row_17_qcow2_metadata_overwritten(daemon: Daemon, fm_env: Env, source: Export) -> None:
    rps = two_points(fm_env, source)
    top = Path(rps[1]["disks"][0]["path"])
    with open(top, "r+b") as f:
        header = f.read(104)
        refcount_table = struct.unpack(">Q", header[48:56])[0]
        f.seek(refcount_table)
        f.write(b"\xde\xad\xbe\xef" * 64)  # refcount table entries point nowhere sane
    r = subprocess.run(["qemu-img", "check", str(top)], capture_output=True, text=True)
    assert r.returncode != 0  # the fault is real
    err = verify_fails(fm_env, rps[1]["id"])
    assert "qcow2" in err and ("damaged" in err or "unreadable" in err), err
    after = {p["id"]: p["verified"] for p in cli(fm_env, "points", "web01")}
    assert after[rps[1]["id"]] == "mismatch"
