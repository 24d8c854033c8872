"""Evidence packs through a real ferrymand without booting anything: the verbs before any
run, and the block hashes of a restore point that has no manifest, read for the pack through
qemu-nbd and equal to the source image. The packs of real test runs and cutovers are checked
in the plan tests that own those runs (tests/helpers/evidence.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import evidence
from appliance.units import MiB
from store.db import open_store
from tests.helpers.daemon import Daemon, Env
from tests.helpers.evidence import cli, raw_digest
from tests.integration.test_plans_daemon import NbdExport, replicate

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture
def source(tmp_path: Path) -> Iterator[NbdExport]:
    img = tmp_path / "ev.raw"
    with open(img, "wb") as f:
        f.truncate(20 * MiB + 4096)  # a partial last block
        f.seek(3 * MiB)
        f.write(os.urandom(2 * MiB + 512))
        f.seek(20 * MiB)
        f.write(b"tail" * 1024)
    exp = NbdExport(img, tmp_path / "ev.sock")
    yield exp
    exp.stop()


def test_verbs_before_any_pack(daemon: Daemon, fm_env: Env, tmp_path: Path) -> None:
    rc, out, packs = cli(fm_env, "list")
    assert rc == 0 and packs == [], out
    rc, out, err = cli(fm_env, "export", "5", "--to", str(tmp_path / "x.json"))
    assert rc == 1 and err["error"]["message"] == "no evidence pack for plan run 5", out
    assert not (tmp_path / "x.json").exists()
    with fm_env.client() as c, pytest.raises(Exception) as e:
        c.evidence_key()
    assert "no evidence signing key yet" in str(e.value)
    rc, out, err = cli(fm_env, "verify", str(tmp_path / "missing.json"))
    assert rc == 1 and "cannot read" in err["error"]["message"], out


def test_a_point_without_manifest_is_hashed_through_qemu_nbd(
    daemon: Daemon, fm_env: Env, source: NbdExport
) -> None:
    rp = replicate(fm_env, "lab", source.uri, "web01")
    db = open_store(fm_env.db, migrate=False)
    try:
        reused = evidence.disk_evidence(db, rp["id"], "test")
        [d] = reused
        assert d["method"].startswith("reused") and d["manifest"]
        # The engine's manifest holds what the source holds.
        assert d["digest"] == raw_digest(source.img)
        assert d["blocks"] == 21 and d["zero_blocks"] == 21 - 4
        Path(d["manifest"]).unlink()
        db.execute(
            "UPDATE restore_point_disks SET manifest=NULL WHERE restore_point_id=?", [rp["id"]]
        )
        [h] = evidence.disk_evidence(db, rp["id"], "evidence test")
    finally:
        db.close()
    assert h["method"].startswith("hashed for this pack"), h
    assert h["digest"] == raw_digest(source.img)
    assert h["hashes_b64"] == d["hashes_b64"]
    readers = list((fm_env.root / "volumes").rglob("readers/*/*.json"))
    assert readers == []  # the pack's reader went with the hashing
