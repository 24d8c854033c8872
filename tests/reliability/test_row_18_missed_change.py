"""Row 18: change tracking misses a block. The source's dirty bitmap is disabled while the
guest writes, so the incremental copies nothing for that write. The full compare at sync time
(verify_every_sync) sees the restore point differ from the snapshot, marks it, and the next
sync is a full resync whose point equals the source again."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.units import MiB
from tests.helpers.daemon import Daemon, Env
from tests.helpers.nbdsrc import Export, assert_equal, cli

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]


def qemu_io(img: Path, cmd: str) -> None:
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(img)], check=True, capture_output=True)


@pytest.fixture
def tracked(tmp_path: Path) -> Iterator[Export]:
    img = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), str(32 * MiB)], check=True)
    qemu_io(img, f"write -P 0x11 0 {4 * MiB}")
    subprocess.run(["qemu-img", "bitmap", "--add", str(img), "b0"], check=True)
    exp = Export(img, tmp_path / "src.sock", fmt="qcow2", bitmap="b0")
    exp.start()
    yield exp
    exp.stop()


def test_row_18_missed_change_found_by_full_compare(
    daemon: Daemon, fm_env: Env, tracked: Export
) -> None:
    cli(
        fm_env,
        "source",
        "add",
        "lab",
        "--kind",
        "nbd",
        "--uri",
        tracked.uri,
        "--param",
        "name=web01",
        "--param",
        "bitmap=b0",
    )
    cli(fm_env, "discover", "lab", "--wait")
    cli(fm_env, "protect", "web01", "--verify-every-sync")
    first = cli(fm_env, "sync", "web01", "--wait")["result"]
    assert first["verified"] == "ok"

    tracked.stop()
    qemu_io(tracked.img, f"write -P 0x22 {8 * MiB} {MiB}")  # tracked by b0
    subprocess.run(["qemu-img", "bitmap", "--disable", str(tracked.img), "b0"], check=True)
    qemu_io(tracked.img, f"write -P 0x33 {20 * MiB} {MiB}")  # NOT tracked: the miss
    tracked.start()

    second = cli(fm_env, "sync", "web01", "--wait")["result"]
    assert second["full"] is False and second["verified"] == "mismatch", second
    assert second["bytes_written"] <= 2 * MiB  # it really copied only what b0 reported
    events = [e["message"] for e in cli(fm_env, "events", "--limit", "100")]
    assert any("blocks differ from the source snapshot" in e for e in events)

    third = cli(fm_env, "sync", "web01", "--wait")["result"]
    assert third["full"] is True and third["verified"] == "ok", third
    point = Path(cli(fm_env, "points", "web01")[-1]["disks"][0]["path"])
    assert_equal(tracked.img, point, fmt="qcow2")
