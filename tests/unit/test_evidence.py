"""Evidence packs without a daemon: canonical form, signing, every kind of edit detected and
named, foreign signers, the appliance's key on disk, and the offline recipes of
docs/evidence.md run as written (python with `cryptography`, openssl)."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance import evidence as ev

ROOT = Path(__file__).resolve().parents[2]


def body() -> dict[str, Any]:
    return {
        "summary": {
            "title": "Test run 7 of plan lab v2: SUCCEEDED",
            "outcome": "succeeded",
            "plan": "lab",
            "plan_version": 2,
            "run_kind": "test",
            "run_id": 7,
            "rto_s": 41.25,
            "note": "Zürich site, ü and é survive canonical form",
        },
        "rto": {"machines": {"web01": {"convert_s": 12.5, "boot_s": 20.0, "ready_s": 8.75}}},
        "rpo": {"machines": {"web01": {"restore_point": 3, "rpo_s": 61.0}}},
        "operator_actions": {"actions": [{"who": "root", "origin": "console", "action": "x"}]},
    }


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def signed(key: Ed25519PrivateKey) -> bytes:
    return ev.render(ev.sign(body(), key))


def test_canonical_form_is_order_free_utf8_and_refuses_nan() -> None:
    a = ev.canonical({"b": 1, "a": {"y": [1, 2], "x": "é"}})
    b = ev.canonical({"a": {"x": "é", "y": [1, 2]}, "b": 1})
    assert a == b == '{"a":{"x":"é","y":[1,2]},"b":1}'.encode()
    with pytest.raises(ValueError):
        ev.canonical({"a": float("nan")})


def test_summary_comes_first_and_a_pack_verifies(key: Ed25519PrivateKey) -> None:
    data = signed(key)
    assert list(json.loads(data))[:2] == ["summary", "rto"]
    assert list(json.loads(data))[-1] == "signature"
    fp = ev.fingerprint(key.public_key())
    v = ev.verify(data, name="p.json", appliance_fingerprint=fp)
    assert v.valid and v.intact and v.signer_is_this_appliance, v
    assert v.line().startswith("p.json: VALID: test run 7 of plan lab v2 (succeeded)")
    assert "this appliance's key" in v.line()


def test_every_single_byte_edit_is_detected(key: Ed25519PrivateKey) -> None:
    data = signed(key)
    fp = ev.fingerprint(key.public_key())
    for i in range(len(data)):
        d = bytearray(data)
        d[i] ^= 0x01
        v = ev.verify(bytes(d), appliance_fingerprint=fp)
        assert not v.valid and not v.intact and v.problem, f"byte {i} ({chr(data[i])!r})"


def test_the_problem_names_what_was_edited(key: Ed25519PrivateKey) -> None:
    data = signed(key)
    text = data.decode()

    def problem(t: str) -> str:
        return str(ev.verify(t.encode()).problem)

    assert "section 'rto' was changed after signing" in problem(
        text.replace('"boot_s": 20.0', '"boot_s": 10.0')
    )
    assert "section 'summary' was changed" in problem(text.replace("41.25", "31.25"))
    pack = json.loads(data)
    del pack["rpo"]
    assert "section 'rpo' was removed after signing" in problem(ev.render(pack).decode())
    pack = json.loads(data)
    pack["extra"] = {"note": "added later"}
    assert "section 'extra' was added after signing" in problem(ev.render(pack).decode())
    pack = json.loads(data)
    pack["signature"]["sections"]["rto"] = "0" * 64
    assert "signature does not match" in problem(ev.render(pack).decode())
    pack = json.loads(data)
    pack["signature"]["key_fingerprint"] = "SHA256:" + "ab" * 32
    assert "fingerprint in the signature block" in problem(ev.render(pack).decode())
    assert "whitespace or key order was edited" in problem(text.replace('": 7,', '":  7,', 1))
    assert "line 2" in problem(text.replace('"summary": {', '"summary":  {', 1))
    assert "not valid JSON" in problem(text[: len(text) // 2])
    del pack["signature"]
    assert "no signature block" in problem(json.dumps(pack))


def test_a_pack_signed_by_another_key_is_foreign(key: Ed25519PrivateKey) -> None:
    other = Ed25519PrivateKey.generate()
    data = ev.render(ev.sign(body(), other))
    mine = ev.fingerprint(key.public_key())
    theirs = ev.fingerprint(other.public_key())
    v = ev.verify(data, name="p", appliance_fingerprint=mine)
    assert v.intact and not v.valid and v.signer_is_this_appliance is False
    assert f"signed by a FOREIGN key {theirs}, not this appliance's {mine}" in str(v.problem)
    # An auditor who trusts the other appliance's key says so; any spelling of it.
    spelled = "sha256:" + ":".join(re.findall("..", theirs[7:].upper()))
    v = ev.verify(data, name="p", key_fingerprint=spelled, appliance_fingerprint=mine)
    assert v.valid and v.signer_is_this_appliance is False, v
    v = ev.verify(data, key_fingerprint=mine)
    assert not v.valid and "--key-fingerprint" in str(v.problem)
    # Nothing to compare with (offline, no fingerprint): intact, and says who signed.
    v = ev.verify(data)
    assert v.valid and v.trusted_by is None and "give --key-fingerprint" in v.line()


def test_signing_key_created_once_root_only(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setenv("FERRYMAN_STATE_DIR", str(tmp_path / "state"))
    k1 = ev.signing_key()
    kp, pp = tmp_path / "state" / "evidence.key", tmp_path / "state" / "evidence.pub"
    assert kp.stat().st_mode & 0o777 == 0o600
    assert pp.stat().st_mode & 0o777 == 0o644
    k2 = ev.signing_key()
    assert ev.fingerprint(k1.public_key()) == ev.fingerprint(k2.public_key())
    assert ev.appliance_key() == {
        "fingerprint": ev.fingerprint(k1.public_key()),
        "public_key_pem": ev.public_pem(k1.public_key()),
    }
    os.chmod(kp, 0o644)
    with pytest.raises(ev.EvidenceError) as e:
        ev.signing_key()
    assert str(kp) in e.value.message and e.value.hint == f"chmod 600 {kp}"


def _doc_block(tag: str) -> str:
    """The fenced block of docs/evidence.md that follows the marker comment ``tag``."""
    doc = (ROOT / "docs" / "evidence.md").read_text()
    m = re.search(rf"<!-- {tag} -->\s*```\w*\n(.*?)```", doc, re.S)
    assert m, f"docs/evidence.md has no block marked {tag}"
    return m.group(1)


def run_doc(tag: str, pack: Path) -> subprocess.CompletedProcess[str]:
    """Run the recipe of docs/evidence.md marked ``tag`` on ``pack``, in the pack's folder."""
    script = _doc_block(tag).replace("PACK.json", str(pack)).replace("python3", sys.executable)
    return subprocess.run(
        ["/bin/sh", "-c", script], capture_output=True, text=True, timeout=60, cwd=pack.parent
    )


def test_the_documented_python_check_runs_offline(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    f = tmp_path / "pack.json"
    f.write_bytes(signed(key))
    r = run_doc("python-verify", f)
    assert r.returncode == 0, r.stderr
    assert f"intact, signed by {ev.fingerprint(key.public_key())}" in r.stdout
    f.write_text(f.read_text().replace("41.25", "31.25"))
    r = run_doc("python-verify", f)
    assert r.returncode != 0 and "section summary changed" in r.stderr, r.stderr


def test_the_documented_openssl_check_runs(key: Ed25519PrivateKey, tmp_path: Path) -> None:
    f = tmp_path / "pack.json"
    f.write_bytes(signed(key))
    r = run_doc("openssl-verify", f)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Signature Verified Successfully" in r.stdout
    assert ev.fingerprint(key.public_key())[7:] in r.stdout  # the DER SHA-256 of the key
    assert len(base64.b64decode(json.loads(f.read_bytes())["signature"]["value"])) == 64
    f.write_text(f.read_text().replace('"signed_at": "2', '"signed_at": "3'))
    r = run_doc("openssl-verify", f)
    assert "Signature Verification Failure" in r.stdout + r.stderr, r.stdout + r.stderr
