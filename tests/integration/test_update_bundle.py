"""Offline update bundles, on this machine (no VM): ferryman-update verifies, installs into a
new venv with no network, switches atomically, keeps the previous release, and rolls back,
restoring the pre-update store copy when the old release cannot read a migrated store.

The VM-level proof (ferrymand restarted under systemd on the new release) is in
tests/e2e/test_appliance_image.py.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UPDATE = ROOT / "images/appliance/overlay/usr/local/sbin/ferryman-update"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(900),
]


def _bundle(out: Path, version: str) -> Path:
    sys.path.insert(0, str(ROOT / "images/appliance"))
    import imagebuild

    return Path(imagebuild.bundle(out, version=version))


def _update(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/usr/bin/python3", str(UPDATE), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_apply_switch_rollback_and_store_restore(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "FERRYMAN_RELEASES": str(tmp_path / "opt"),
        "FERRYMAN_BIN_DIR": str(tmp_path / "bin"),
        "FERRYMAN_STATE_DIR": str(tmp_path / "state"),
    }
    (tmp_path / "bin").mkdir()
    (tmp_path / "state").mkdir()
    b1 = _bundle(tmp_path / "b1", "0.1.0.post1")
    b2 = _bundle(tmp_path / "b2", "0.1.0.post2")
    ferryman = tmp_path / "bin" / "ferryman"

    r = _update(env, "apply", "--json", str(b1))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["previous"] is None
    assert (
        subprocess.run([ferryman, "--version"], capture_output=True, text=True).stdout.split()[-1]
        == "0.1.0.post1"
    )
    # A store written by release 1.
    subprocess.run(
        [
            tmp_path / "opt/current/venv/bin/python",
            "-c",
            "from pathlib import Path; from store.db import open_store; "
            f"open_store(Path('{tmp_path}/state/state.db')).close()",
        ],
        check=True,
    )

    # A damaged bundle and a wrong checksum are refused before anything changes.
    bad = tmp_path / "bad.tar"
    data = bytearray(b2.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    r = _update(env, "apply", "--json", "--sha256", "0" * 64, str(b2))
    assert r.returncode == 1 and "sha256" in json.loads(r.stdout)["error"]["message"]
    Path(f"{bad}.sha256").write_text(Path(f"{b2}.sha256").read_text())
    r = _update(env, "apply", "--json", str(bad))
    assert r.returncode == 1 and "copy it again" in json.loads(r.stdout)["error"]["message"]
    assert json.loads(_update(env, "status", "--json").stdout)["current"].startswith("0.1.0.post1")

    r = _update(env, "apply", "--json", str(b2))
    assert r.returncode == 0, r.stderr
    applied = json.loads(r.stdout)
    assert applied["previous"].startswith("0.1.0.post1") and applied["store_backup"]
    assert (
        subprocess.run([ferryman, "--version"], capture_output=True, text=True).stdout.split()[-1]
        == "0.1.0.post2"
    )

    # Release 2 "migrates" the store to a schema release 1 does not know.
    conn = sqlite3.connect(tmp_path / "state/state.db")
    conn.execute(
        "INSERT INTO _sqlite_migrations (migration_set, name, applied_at) "
        "VALUES ('ferryman', 'm999_from_the_future', 'now')"
    )
    conn.commit()
    conn.close()
    r = _update(env, "rollback", "--json")
    assert r.returncode == 0, r.stderr
    back = json.loads(r.stdout)
    assert back["current"].startswith("0.1.0.post1") and back["previous"].startswith("0.1.0.post2")
    assert back["store_restored_from"] == applied["store_backup"]
    assert (
        subprocess.run([ferryman, "--version"], capture_output=True, text=True).stdout.split()[-1]
        == "0.1.0.post1"
    )
    conn = sqlite3.connect(tmp_path / "state/state.db")
    names = [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations")]
    conn.close()
    assert "m999_from_the_future" not in names
    kept = list((tmp_path / "state").glob("state.db.from-0.1.0.post2-*"))
    assert len(kept) == 1  # the newer store is kept beside, not deleted

    # Re-applying the release rolled back from reuses its venv.
    r = _update(env, "apply", "--json", str(b2))
    assert r.returncode == 0 and "installed already" in r.stderr
