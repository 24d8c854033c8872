"""Seeding over removable media, between two real appliances.

Appliance A (the source site) and appliance B (the target site) are two ferrymand daemons
with their own stores and volume stores. The source is a qcow2 served by qemu-nbd with a
persistent dirty bitmap (b0), so an incremental is truly incremental: it reads only what the
bitmap marks. A syncs in full and exports a seed; one flipped byte makes B refuse it naming
the chunk; the clean seed becomes B's first restore point, equal to the source block for
block; B's next sync reads and writes only what changed at the source since the seed.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.seeding import SeedError, open_seed
from appliance.units import MiB
from tests.helpers.daemon import Daemon, Env, run_cli, running_daemon
from tests.helpers.nbdsrc import (
    Export,
    assert_equal,
    cli,
    point_path,
    register,
    source,
    write_random,
)

_ = source  # fixture

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

CHUNK = 4 * MiB


def qemu_io(img: Path, *cmds: str) -> None:
    args = [a for c in cmds for a in ("-c", c)]
    subprocess.run(["qemu-io", "-f", "qcow2", *args, str(img)], check=True, capture_output=True)


@pytest.fixture
def tracked(tmp_path: Path) -> Iterator[Export]:
    """32 MiB qcow2: data in chunks 0, 2 and 5 (of 4 MiB), chunk 6 written with zeroes, the
    rest never written; the bitmap b0 starts before the first sync."""
    img = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(32 * MiB)], check=True)
    qemu_io(img, f"write -P 0x11 0 {3 * MiB}", f"write -P 0x12 {9 * MiB} {MiB}")
    qemu_io(img, f"write -P 0x13 {20 * MiB} {2 * MiB}")
    qemu_io(img, f"write -P 0 {24 * MiB} {4 * MiB}")  # allocated, but zeroes: not stored
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    exp = Export(img, tmp_path / "src.sock", fmt="qcow2", bitmap="b0")
    exp.start()
    yield exp
    exp.stop()


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[tuple[Env, Env]]:
    a, b = Env(tmp_path / "a"), Env(tmp_path / "b")
    with running_daemon(a, "--no-probe"), running_daemon(b, "--no-probe"):
        yield a, b


def export(env: Env, seed: Path, chunk: str, *extra: str) -> dict:  # type: ignore[type-arg]
    return cli(env, "seed", "export", "web01", "--to", str(seed), *extra, "--chunk-size", chunk)


def kill_when(d: Daemon, what: str, count: Callable[[], int], at_least: int = 5) -> int:
    """kill -9 the daemon as soon as count() reaches at_least (fails if it never does)."""
    end = time.monotonic() + 120
    n = 0
    while time.monotonic() < end and n < at_least:
        n = count()
        time.sleep(0.01)
    d.kill9()
    if n < at_least:
        pytest.fail(f"{what}: fewer than {at_least} chunks done within 120 s")
    return n


def extents_done(env: Env) -> int:
    con = sqlite3.connect(env.db)
    try:
        return int(con.execute("SELECT count(*) FROM sync_extents").fetchone()[0])
    finally:
        con.close()


def fails(env: Env, *args: str) -> str:
    r = run_cli(env, *args, timeout=300)
    assert r.returncode != 0, f"{args} succeeded: {r.stdout}"
    return (r.stdout + r.stderr).strip()


def test_seed_export_corrupt_refused_clean_imports_then_incremental(
    sites: tuple[Env, Env], tracked: Export, tmp_path: Path
) -> None:
    a, b = sites
    key = tmp_path / "web01.key"
    cli(a, "seed", "keygen", str(key))
    assert key.stat().st_mode & 0o077 == 0

    # Site A: full sync, then the seed (chunks of 4 MiB: 3 hold data, 5 are zero).
    register(a, tracked, "--param", "bitmap=b0")
    full = cli(a, "sync", "web01", "--wait")["result"]
    assert full["full"] is True
    seed = tmp_path / "media" / "web01"
    (seed / "lost+found").mkdir(parents=True)  # a freshly made ext4 on the media
    (tmp_path / "media" / "notes.txt").write_text("site B, rack 4")
    line = fails(a, "seed", "export", "web01", "--to", str(tmp_path / "media"), "--key-file",
                 str(key), "--wait")  # fmt: skip
    assert "is not empty and holds no seed" in line, line
    t0 = time.monotonic()
    job = export(a, seed, "4MiB", "--key-file", str(key), "--wait")
    export_s = time.monotonic() - t0
    res = job["result"]
    assert job["state"] == "succeeded", job
    assert (res["chunks_written"], res["chunks_zero"]) == (3, 5), res
    assert sorted(p.name for p in (seed / "disk0").iterdir()) == [
        "000000.chunk",
        "000002.chunk",
        "000005.chunk",
    ]
    header = json.loads((seed / "seed.json").read_text())
    assert header["state"] == "complete" and header["data_bytes"] == 3 * CHUNK
    # Encrypted: the source's byte pattern appears nowhere on the media.
    for f in (seed / "disk0").iterdir():
        assert b"\x11" * 64 not in f.read_bytes() and b"\x13" * 64 not in f.read_bytes()
    sums = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=seed, capture_output=True)
    assert sums.returncode == 0, sums.stdout

    # Site B: the same source over the "thin link", discovered, no restore point yet.
    register(b, tracked, "--param", "bitmap=b0")
    shown = cli(b, "seed", "show", str(seed))  # no key needed
    assert shown["state"] == "complete" and shown["machine"]["name"] == "web01", shown
    assert shown["chunk_files"] == 3 and shown["point"]["id"] == header["point"]["id"]
    with b.client() as c:
        assert c.seed_show(str(seed))["seed_id"] == header["seed_id"]
    bad = tmp_path / "media-bad" / "web01"
    shutil.copytree(seed, bad)
    victim = bad / "disk0" / "000002.chunk"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    line = fails(b, "seed", "import", str(bad), "--key-file", str(key), "--wait")
    assert len(line.splitlines()) == 1, line
    assert "disk0/000002.chunk" in line and "offset 8388608" in line and "corrupt" in line, line
    assert "copy that file again" in line, line
    print(line)
    assert cli(b, "points", "web01") == []  # no half-made restore point

    # A missing chunk is refused before anything is read, named the same way.
    (bad / "disk0" / "000005.chunk").unlink()
    line = fails(b, "seed", "import", str(bad), "--key-file", str(key), "--wait")
    assert "disk0/000005.chunk" in line and "missing" in line and "20971520" in line, line
    # The wrong key opens nothing.
    other = tmp_path / "other.key"
    cli(b, "seed", "keygen", str(other))
    line = fails(b, "seed", "import", str(seed), "--key-file", str(other), "--wait")
    assert "does not open the seed" in line, line
    assert cli(b, "points", "web01") == []

    # The clean seed: resumes after the chunk the corrupt copy stopped at.
    t0 = time.monotonic()
    job = cli(b, "seed", "import", str(seed), "--key-file", str(key), "--wait")
    import_s = time.monotonic() - t0
    res = job["result"]
    assert job["state"] == "succeeded", job
    assert res["bytes_skipped_resume"] == 2 * CHUNK, res  # chunks 0 and 1 were durable
    assert res["bytes_written"] == 2 * CHUNK, res  # chunks 2 and 5
    p1, rp1 = point_path(b, "web01")
    assert rp1["full"] == 1 and rp1["parent_id"] is None and rp1["verified"] == "ok"
    assert rp1["token"]["kind"] == "nbd"
    tracked.stop()
    assert_equal(tracked.img, p1, fmt="qcow2")

    # Changes at the source after the seed: 1 MiB + 64 KiB.
    qemu_io(tracked.img, f"write -P 0x44 {12 * MiB} {MiB}", f"write -P 0x45 {28 * MiB} 65536")
    tracked.start()
    inc = cli(b, "sync", "web01", "--wait")["result"]
    changed = MiB + 65536
    assert inc["full"] is False, inc
    assert changed <= inc["bytes_written"] <= changed + 128 * 1024, inc
    assert inc["bytes_read"] <= changed + 128 * 1024, inc
    p2, rp2 = point_path(b, "web01")
    assert rp2["parent_id"] == rp1["id"]
    tracked.stop()
    assert_equal(tracked.img, p2, fmt="qcow2")
    con = sqlite3.connect(b.db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    print(f"export {export_s:.1f} s, import {import_s:.1f} s, incremental {inc}")


def test_export_and_import_killed_midway_resume_without_recopying(
    fm_env: Env, tmp_path: Path
) -> None:
    """kill -9 of ferrymand in the middle of an export, then of the other ferrymand in the
    middle of the import: each next daemon resumes its job, keeps what is already done (the
    chunk files untouched, the imported extents not written again) and completes. The seed
    is made with a passphrase (scrypt) this time."""
    img = tmp_path / "big.raw"
    with open(img, "wb") as f:
        for i in range(256):
            f.write(bytes([i % 250 + 1]) * MiB)
    src = Export(img, tmp_path / "big.sock")
    src.start()
    pw = tmp_path / "pass"
    pw.write_text("a long enough passphrase\n")
    keys = ("--passphrase-file", str(pw))
    seed = tmp_path / "media" / "big"
    journal = seed / "journal.jsonl"
    d = Daemon(fm_env, "--no-probe")
    try:
        d.wait_ready()
        register(fm_env, src)
        cli(fm_env, "sync", "web01", "--wait")
        job = export(fm_env, seed, "1MiB", *keys)
        kill_when(
            d, "export", lambda: len(journal.read_text().splitlines()) if journal.exists() else 0
        )
        before = {
            p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (seed / "disk0").glob("*.chunk")
        }
        assert 5 <= len(before) < 256, f"killed too late: {len(before)} chunks already there"
        assert json.loads((seed / "seed.json").read_text())["state"] == "exporting"
        with pytest.raises(SeedError, match=r"incomplete: its export stopped before chunk disk0/"):
            open_seed(seed, None, str(pw))
    finally:
        d.stop()
    with running_daemon(fm_env, "--no-probe"):
        with fm_env.client() as c:
            done = c.wait(job["id"], timeout=600)
        assert done["state"] == "succeeded", done
        res = done["result"]
        assert res["resumed"] is True
        assert res["chunks_skipped_resume"] >= len(before) - 1, res  # the last may be torn
        assert res["chunks_skipped_resume"] + res["chunks_written"] == 256, res
        after = {
            p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in (seed / "disk0").glob("*.chunk")
        }
        assert len(after) == 256
        kept = sum(1 for n, v in before.items() if after[n] == v)
        assert kept == res["chunks_skipped_resume"], (kept, res)

    b = Env(tmp_path / "b")
    d = Daemon(b, "--no-probe")
    try:
        d.wait_ready()
        register(b, src)
        job = cli(b, "seed", "import", str(seed), *keys)
        n = kill_when(d, "import", lambda: extents_done(b))
    finally:
        d.stop()
    con = sqlite3.connect(b.db)  # nothing half-made is listed
    assert con.execute("SELECT count(*) FROM restore_points").fetchone()[0] == 0
    con.close()
    with running_daemon(b, "--no-probe"):
        with b.client() as c:
            done = c.wait(job["id"], timeout=600)
        assert done["state"] == "succeeded", done
        res = done["result"]
        assert res["bytes_skipped_resume"] >= n * MiB, res
        assert res["bytes_skipped_resume"] + res["bytes_written"] == 256 * MiB, res
        point, _rp = point_path(b, "web01")
        src.stop()
        assert_equal(img, point)


def test_seed_then_hash_compare_incremental_and_rot_not_exported(
    sites: tuple[Env, Env], source: Export, tmp_path: Path
) -> None:
    """An NBD source without a dirty bitmap: the next sync after the import compares block
    hashes against the manifest the seed brought, and writes only the changed blocks. A
    restore point that rotted on the source site's disk is not exported."""
    a, b = sites
    key = tmp_path / "k"
    cli(a, "seed", "keygen", str(key))
    register(a, source)
    cli(a, "sync", "web01", "--wait")
    seed = tmp_path / "media" / "web01"
    job = export(a, seed, "8MiB", "--key-file", str(key), "--wait")
    assert job["state"] == "succeeded", job
    register(b, source)
    assert cli(b, "seed", "import", str(seed), "--key-file", str(key), "--wait")["state"] == (
        "succeeded"
    )
    source.stop()
    write_random(source.img, 10 * MiB, MiB, 7)
    source.start()
    inc = cli(b, "sync", "web01", "--wait")["result"]
    assert inc["full"] is False and inc["bytes_written"] == MiB, inc
    point, _rp = point_path(b, "web01")
    assert_equal(source.img, point)

    # Two bytes flipped inside a data cluster of A's point: the export refuses, naming it.
    a_point, _ = point_path(a, "web01")
    extents = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", str(a_point)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    first = next(e for e in extents if e["data"] and e.get("offset") is not None)
    with open(a_point, "r+b") as f:
        f.seek(first["offset"] + 4096)
        old = f.read(2)
        f.seek(first["offset"] + 4096)
        f.write(bytes(x ^ 0xFF for x in old))
    line = fails(a, "seed", "export", "web01", "--to", str(tmp_path / "media" / "again"),
                 "--key-file", str(key), "--wait")  # fmt: skip
    where = f"offset {first['start']}"
    assert "differs from the hashes taken when it was made" in line and where in line, line
