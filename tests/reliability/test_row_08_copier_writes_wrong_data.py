"""Row 8: the copier itself writes wrong data. A copier with a planted bug flips one byte of
one write.

- Against a destination that checks every write (nbdkit --filter=checkwrite over the same
  sparse-random data as the source), the bad write fails at once with the disk and offset,
  and the journal never claims the extent; the same copier without the bug passes.
- In a real ferrymand (the bug injected by tests/reliability/inject/sitecustomize.py) the
  restore point's verification against the source snapshot finds the block, says so in an
  error event and marks the point "mismatch"; the next sync is a full resync whose point
  equals the source block for block."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.datapath.copier import Copier
from appliance.datapath.errors import TargetWriteError
from appliance.sources.base import Extent
from appliance.units import MiB
from tests.datapath_fixtures import *  # noqa: F403
from tests.datapath_fixtures import RecordingJournal
from tests.helpers.daemon import Daemon, Env
from tests.helpers.nbdsrc import Export, assert_equal, cli, point_path, register
from tests.helpers.nbdsrc import source as source

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(300)]

SIZE = 32 * MiB
BAD_AT = 9 * MiB + 4321
INJECT = Path(__file__).parent / "inject"


class BuggyCopier(Copier):
    """Flips one byte of the write that covers BAD_AT."""

    def _submit_write(self, r, *, zero):  # type: ignore[no-untyped-def]
        if not zero and r.buf is not None and r.offset <= BAD_AT < r.offset + r.length:
            data = bytearray(r.buf.to_bytearray())
            data[BAD_AT - r.offset] ^= 0x5A
            import nbd

            r.buf = nbd.Buffer.from_bytearray(data)
        return super()._submit_write(r, zero=zero)


def _copy(cls, src, dst):  # type: ignore[no-untyped-def]
    journal = RecordingJournal()
    cp = cls(disk_key="vda", source_uri=src.uri, target_uri=dst.uri, journal=journal)
    return cp, journal, lambda: cp.copy([Extent(0, SIZE, False)])


def test_row_08_checkwrite_destination_catches_a_wrong_write(nbdkit_server) -> None:  # type: ignore[no-untyped-def]
    data = ("sparse-random", f"size={SIZE}", "percent=50", "seed=81")
    src = nbdkit_server(*data)
    dst = nbdkit_server("--filter=checkwrite", *data)
    # The copier as shipped: every write matches what the destination expects.
    _, journal, run = _copy(Copier, src, dst)
    stats = run()
    assert stats.bytes_read == SIZE and stats.retries == 0
    assert sum(n for _, n in journal.ranges("vda")) == SIZE

    # The same copy with one flipped byte: refused loudly, never journaled.
    _, journal, run = _copy(BuggyCopier, src, dst)
    with pytest.raises(TargetWriteError) as e:
        run()
    err = e.value
    assert err.errno == 5 and err.offset <= BAD_AT < err.offset + MiB
    assert f"at offset {err.offset} failed with EIO" in err.message
    assert not [(o, n) for o, n in journal.ranges("vda") if o <= BAD_AT < o + n]


@pytest.fixture
def buggy_daemon(fm_env: Env, tmp_path: Path) -> Iterator[tuple[Daemon, Path]]:
    flag = tmp_path / "corrupt-at"
    os.environ["PYTHONPATH"] = str(INJECT)
    os.environ["FERRYMAN_TEST_CORRUPT_WRITE"] = str(flag)
    try:
        d = Daemon(fm_env, "--no-probe")
    finally:
        del os.environ["PYTHONPATH"], os.environ["FERRYMAN_TEST_CORRUPT_WRITE"]
    try:
        d.wait_ready()
        yield d, flag
    finally:
        d.stop()


def test_row_08_daemon_verification_finds_the_wrong_block_then_resyncs(
    buggy_daemon: tuple[Daemon, Path], fm_env: Env, source: Export
) -> None:
    _, flag = buggy_daemon
    bad = 5 * MiB + 777  # inside the source fixture's data at 5 MiB
    flag.write_text(str(bad))
    register(fm_env, source)
    cli(fm_env, "protect", "web01", "--verify-every-sync")
    first = cli(fm_env, "sync", "web01", "--wait")["result"]
    assert not flag.exists(), "the planted bug did not fire"
    assert first["verified"] == "mismatch", first
    events = [e["message"] for e in cli(fm_env, "events", "--limit", "100")]
    block = [e for e in events if "blocks differ from the source snapshot" in e]
    assert block and "first at offset" in block[0], events
    first_at = int(block[0].split("first at offset ")[1].split(")")[0])
    assert first_at <= bad < first_at + 2 * MiB
    p1, rp1 = point_path(fm_env, "web01")
    assert rp1["verified"] == "mismatch"

    second = cli(fm_env, "sync", "web01", "--wait")["result"]
    assert second["full"] is True and second["verified"] == "ok", second
    p2, _ = point_path(fm_env, "web01")
    assert p2 != p1
    assert_equal(source.img, p2)
    con = sqlite3.connect(fm_env.db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
