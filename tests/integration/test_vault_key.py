"""The vault key at rest: sealed by the real systemd-creds (host key) where it works, a
root-only file otherwise; doctor says which. systemd is not PID 1 here, but
``systemd-creds encrypt --with-key=host`` needs only /var/lib/systemd/credential.secret, so
the sealed path runs for real on this machine, and the fallback path by taking systemd-creds
off PATH or asking for a file."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from appliance.errors import StoreError
from store.db import open_store
from store.secrets import CRED_NAME, HOST_SECRET, Vault, unseal
from tests.helpers.daemon import Env, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

CANARY = "Canary-Vault-7f3e9a"


def _roundtrip(tmp_path: Path, vault: Vault) -> int:
    db = open_store(tmp_path / "state.db")
    cid = vault.put(db, "source lab", "admin", CANARY)
    # A fresh vault (another process, a restart) opens the same key.
    again = Vault(vault.key_path, backend=vault.want)
    assert again.get(db, cid) == ("admin", CANARY)
    db.close()
    raw = (tmp_path / "state.db").read_bytes()
    assert CANARY.encode() not in raw
    return cid


def test_sealed_with_systemd_creds_when_it_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FERRYMAN_VAULT_KEY", raising=False)
    v = Vault(tmp_path / "secret.key")
    assert v.backend == "none"
    _roundtrip(tmp_path, v)
    assert v.backend == "systemd-creds", v.fallback_reason
    assert not v.key_path.exists()  # no clear key on disk
    assert (v.sealed_path.stat().st_mode & 0o777) == 0o600
    assert (HOST_SECRET.stat().st_mode & 0o777) == 0o400
    blob = v.sealed_path.read_bytes()
    key = unseal(blob).strip()
    assert key not in blob and len(key) == 44  # a Fernet key, sealed
    # The real systemd-creds, called by hand, opens it only under its name.
    r = subprocess.run(
        ["systemd-creds", "decrypt", f"--name={CRED_NAME}", str(v.sealed_path), "-"],
        capture_output=True,
    )
    assert r.returncode == 0 and r.stdout.strip() == key
    r = subprocess.run(
        ["systemd-creds", "decrypt", "--name=other", str(v.sealed_path), "-"], capture_output=True
    )
    assert r.returncode != 0
    # A damaged sealed key is refused with the fix, never a traceback of cryptography.
    damaged = bytearray(blob)
    damaged[len(damaged) // 2] ^= 0xFF
    v.sealed_path.write_bytes(bytes(damaged))
    with pytest.raises(StoreError) as e:
        Vault(v.key_path)._key()
    assert "cannot be opened" in e.value.message and str(HOST_SECRET) in (e.value.hint or "")


def test_fallback_file_when_systemd_creds_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FERRYMAN_VAULT_KEY", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no systemd-creds to be found
    v = Vault(tmp_path / "secret.key")
    _roundtrip(tmp_path, v)
    assert v.backend == "file" and not v.sealed_path.exists()
    assert v.fallback_reason == "systemd-creds is not installed"
    assert (v.key_path.stat().st_mode & 0o777) == 0o600
    # Asked for systemd-creds explicitly, the missing tool is an error, not a silent file.
    with pytest.raises(StoreError, match="systemd-creds is not installed"):
        Vault(tmp_path / "other" / "secret.key", backend="systemd-creds")._key()


def test_file_on_request_then_sealed_by_seal_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = Env(tmp_path)
    for k, val in env.vars().items():
        monkeypatch.setenv(k, val)
    env.state_dir.mkdir(parents=True)
    monkeypatch.setenv("FERRYMAN_VAULT_KEY", "file")
    v = Vault(env.state_dir / "secret.key")
    db = open_store(env.db)
    cid = v.put(db, "source lab", "admin", CANARY)
    db.close()
    assert v.backend == "file"

    def doctor_row() -> dict[str, str]:
        r = run_cli(env, "doctor", "--quick", "--json", timeout=300)
        rows = {c["part"]: c for c in json.loads(r.stdout)["checks"]}
        return rows["secret key"]

    row = doctor_row()
    assert row["verdict"] == "warn" and "root-only file" in row["detail"]
    assert row["fix"] == "seal it: ferryman store seal-key"
    r = run_cli(env, "store", "seal-key", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["backend"] == "systemd-creds" and not v.key_path.exists()
    db = open_store(env.db)
    assert Vault(v.key_path).get(db, cid) == ("admin", CANARY)
    db.close()
    row = doctor_row()
    assert row["verdict"] == "ok" and row["detail"].startswith("systemd-creds: ")
    assert "opens" in row["detail"]
    con = sqlite3.connect(env.db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    assert os.geteuid() == 0  # the doctor row above is root's view
