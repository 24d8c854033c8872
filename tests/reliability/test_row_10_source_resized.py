"""Row 10: the source disk is resized between syncs (grown, then shrunk below its first size).

The explicit resize path: a qcow2 overlay cannot change the size of its backing chain, so a
sync of a resized disk is a full copy into a NEW chain beside the old one
(``<disk>.size-<bytes>``), never a write into the old chain. The old points stay untouched
(same bytes, same mtime) and restorable (equal to the source as it was); each new point
equals the source as it is now."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3
from pathlib import Path

import pytest

from appliance.units import MiB
from tests.helpers.daemon import Daemon, Env
from tests.helpers.nbdsrc import Export, assert_equal, cli, point_path, register, write_random
from tests.helpers.nbdsrc import source as source

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(300)]


def _fingerprint(p: Path) -> tuple[str, int]:
    return hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns


def _resize(source: Export, size: int) -> None:
    source.stop()
    with open(source.img, "r+b") as f:
        f.truncate(size)
    source.start()


def test_row_10_resized_source_gets_a_new_chain_old_points_untouched(
    daemon: Daemon, fm_env: Env, source: Export, tmp_path: Path
) -> None:
    register(fm_env, source)
    first = cli(fm_env, "sync", "web01", "--wait")["result"]
    assert first["full"] is True
    p1, rp1 = point_path(fm_env, "web01")
    old_src = tmp_path / "source-64M.raw"
    shutil.copyfile(source.img, old_src)
    fp1 = _fingerprint(p1)

    # Grown by 16 MiB, with data in the new tail and a change in the old part.
    _resize(source, 80 * MiB)
    source.stop()
    write_random(source.img, 70 * MiB, MiB, 101)
    write_random(source.img, 2 * MiB, MiB, 102)
    source.start()
    grown = cli(fm_env, "sync", "web01", "--wait")["result"]
    assert grown["full"] is True and grown["disks"][0]["size"] == 80 * MiB, grown
    p2, rp2 = point_path(fm_env, "web01")
    assert p2.parent.name == f"{p1.parent.name}.size-{80 * MiB}", p2
    assert p2.parent != p1.parent and rp2["id"] != rp1["id"]
    assert_equal(source.img, p2)
    grown_src = tmp_path / "source-80M.raw"
    shutil.copyfile(source.img, grown_src)

    # Shrunk below the first size: a third chain, the source smaller than every target.
    _resize(source, 48 * MiB)
    shrunk = cli(fm_env, "sync", "web01", "--wait")["result"]
    assert shrunk["full"] is True and shrunk["disks"][0]["size"] == 48 * MiB, shrunk
    p3, _ = point_path(fm_env, "web01")
    assert p3.parent.name == f"{p1.parent.name}.size-{48 * MiB}", p3
    assert_equal(source.img, p3)

    # Nothing was written into the older chains; they still hold the sources as they were.
    assert _fingerprint(p1) == fp1
    assert_equal(old_src, p1)
    assert_equal(grown_src, p2)
    points = cli(fm_env, "points", "web01")
    assert [len(p["disks"]) for p in points] == [1, 1, 1]
    assert [p["disks"][0]["size"] for p in points] == [64 * MiB, 80 * MiB, 48 * MiB]
    con = sqlite3.connect(fm_env.db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
