"""Checks of the evidence pack a real run wrote, shared by the plan tests that own the runs
(no extra guest boot): listed, exported byte for byte, valid and signed by this appliance,
its disk hashes equal to the source image, one edited byte caught and named, a pack
re-signed by another key reported as foreign."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import evidence as ev
from appliance.units import MiB
from tests.helpers.daemon import Env, run_cli


def raw_digest(img: Path, block: int = MiB) -> str:
    """What a pack's disk ``digest`` must be for this raw image: SHA-256 over the SHA-256 of
    each block, computed here from the file, independently of the engine."""
    hashes = []
    with open(img, "rb") as f:
        while b := f.read(block):
            hashes.append(hashlib.sha256(b).digest())
    return hashlib.sha256(b"".join(hashes)).hexdigest()


def cli(env: Env, *args: str) -> tuple[int, str, Any]:
    r = run_cli(env, "evidence", *args, "--json", timeout=300)
    try:
        data = json.loads(r.stdout)
    except ValueError:
        data = None
    return r.returncode, r.stdout + r.stderr, data


def check_pack(
    env: Env, run_id: int, tmp: Path, *, outcome: str, source: Path | None = None
) -> dict[str, Any]:
    """The pack of ``run_id``: listed, exported, valid; with ``source`` every disk that
    booted hashes like that raw image. Returns the parsed pack."""
    rc, out, packs = cli(env, "list")
    assert rc == 0, out
    entry = next((p for p in packs if p.get("run_id") == run_id), None)
    assert entry is not None and entry["outcome"] == outcome, packs
    f = tmp / f"evidence-run-{run_id}.json"
    rc, out, exp = cli(env, "export", str(run_id), "--to", str(f))
    assert rc == 0, out
    data = f.read_bytes()
    assert exp["sha256"] == hashlib.sha256(data).hexdigest()
    with env.client() as c:
        pointer = c.test_run_show(run_id)["report"]["evidence"]
    assert pointer["sha256"] == exp["sha256"] and pointer["outcome"] == outcome, pointer
    r = run_cli(env, "evidence", "verify", str(f))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{f}: VALID" in r.stdout and "= this appliance's key" in r.stdout, r.stdout
    pack = json.loads(data)
    s = pack["summary"]
    assert (s["run_id"], s["outcome"]) == (run_id, outcome), s
    assert list(pack)[:: len(pack) - 1] == ["summary", "signature"]  # summary first
    mine = ev.appliance_key()
    assert mine is not None and pack["signature"]["key_fingerprint"] == mine["fingerprint"]
    assert "BEGIN PRIVATE KEY" not in data.decode()
    if source is not None:
        want = raw_digest(source)
        for machine, disks in pack["disks"].items():
            assert disks, f"{machine}: no disk evidence"
            for d in disks:
                assert d["hashed"] is True and d["digest"] == want, (machine, d.get("why"))
                assert d["method"].startswith(("reused", "hashed for this pack"))
    return pack


def check_tamper_and_foreign(env: Env, run_id: int, tmp: Path) -> None:
    """One byte of an exported pack edited: exit 1 naming the section. The same content
    re-signed with another key: exit 1 as foreign, valid only with that key's fingerprint."""
    f = tmp / f"evidence-run-{run_id}.json"
    data = f.read_bytes()
    at = data.index(b'"started_at": "') + len(b'"started_at": "') + 3  # a digit of the year
    bad = bytearray(data)
    bad[at] = ord("7") if data[at] != ord("7") else ord("8")
    t = tmp / "tampered.json"
    t.write_bytes(bytes(bad))
    r = run_cli(env, "evidence", "verify", str(t))
    assert r.returncode == 1, r.stdout
    lines = r.stdout.strip().splitlines()
    assert lines == [
        f"{t}: INVALID: section 'summary' was changed after signing: its SHA-256 is "
        + lines[0].split("its SHA-256 is ")[1]
    ], r.stdout
    rc, out, v = cli(env, "verify", str(t))
    assert rc == 1 and v["valid"] is False and "section 'summary'" in v["problem"], out

    other = Ed25519PrivateKey.generate()
    body = {k: val for k, val in json.loads(data).items() if k != "signature"}
    g = tmp / "foreign.json"
    g.write_bytes(ev.render(ev.sign(body, other)))
    theirs = ev.fingerprint(other.public_key())
    r = run_cli(env, "evidence", "verify", str(g))
    assert r.returncode == 1, r.stdout
    assert f"signed by a FOREIGN key {theirs}, not this appliance's" in r.stdout, r.stdout
    rc, out, v = cli(env, "verify", str(g), "--key-fingerprint", theirs)
    assert rc == 0 and v["valid"] is True and v["signer_is_this_appliance"] is False, out
