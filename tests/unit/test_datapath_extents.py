"""Pure extent arithmetic and the throttle (no servers)."""

from __future__ import annotations

import pytest

from appliance.datapath import extents as ex
from appliance.datapath.throttle import Throttle
from appliance.sources.base import Extent

MiB = 1024 * 1024


def test_combine_intersects_dirty_with_allocation():
    alloc = [(0, 4 * MiB, 0), (4 * MiB, 8 * MiB, ex.STATE_ZERO | ex.STATE_HOLE)]
    dirty = [(0, 1 * MiB, 0), (1 * MiB, 6 * MiB, ex.DIRTY), (6 * MiB, 8 * MiB, 0)]
    out = list(ex._combine(0, 8 * MiB, alloc, dirty))
    assert out == [Extent(1 * MiB, 3 * MiB, False), Extent(4 * MiB, 2 * MiB, True)]


def test_combine_without_bitmap_covers_everything():
    alloc = [(0, 1 * MiB, 0), (1 * MiB, 3 * MiB, ex.STATE_ZERO)]
    assert list(ex._combine(0, 3 * MiB, alloc, None)) == [
        Extent(0, MiB, False),
        Extent(MiB, 2 * MiB, True),
    ]


def test_subtract_done_ranges():
    exts = [Extent(0, 10, False), Extent(20, 10, True)]
    assert ex.subtract(exts, [(2, 3), (8, 15), (25, 100)]) == [
        Extent(0, 2, False),
        Extent(5, 3, False),
        Extent(23, 2, True),
    ]
    assert ex.subtract(exts, []) == exts
    assert ex.subtract(exts, [(0, 100)]) == []


def test_split_respects_limits_and_grid():
    out = list(ex.split([Extent(MiB // 2, 3 * MiB, False)], MiB))
    assert [e.length for e in out] == [MiB // 2, MiB, MiB, MiB // 2]
    assert all(e.length <= MiB for e in out)
    assert all(e.offset % MiB == 0 for e in out[1:])
    zeros = list(ex.split([Extent(0, 5 * ex.MAX_ZERO_REQUEST // 2, True)], MiB))
    assert all(e.length <= ex.MAX_ZERO_REQUEST for e in zeros) and len(zeros) == 3


def test_snap_to_blocks_widens_partial_blocks():
    exts = [Extent(0, MiB + 4096, False), Extent(MiB + 4096, 3 * MiB - 4096, True)]
    out = ex.snap_to_blocks(exts, MiB, 4 * MiB)
    assert out == [Extent(0, 2 * MiB, False), Extent(2 * MiB, 2 * MiB, True)]


def test_coalesce_and_merge():
    assert ex.coalesce_ranges([(10, 5), (0, 10), (20, 1), (15, 0)]) == [(0, 15), (20, 1)]
    assert ex.merge([Extent(5, 5, True), Extent(0, 5, True), Extent(10, 5, False)]) == [
        Extent(0, 10, True),
        Extent(10, 5, False),
    ]


class FakeClock:
    """A settable clock: the throttle's time source is injected, as every engine API's is."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_throttle_rate_and_live_change():
    clk = FakeClock()
    th = Throttle(4 * MiB, clock=clk)
    clk.t = 1.0
    assert th.reserve(MiB) == 0.0  # the bucket (1 MiB) is full after a second
    wait = th.reserve(MiB)
    assert wait == pytest.approx(0.25)  # 1 MiB at 4 MiB/s
    th.set_rate(None)  # the operator lifts the limit while the sync runs
    assert th.reserve(100 * MiB) == 0.0
    th.set_rate(2 * MiB)
    clk.t = 2.0
    assert th.reserve(MiB) == 0.0  # a request larger than the bucket passes when it is full
    assert th.reserve(MiB) == pytest.approx(0.5)  # ... and the debt is paid at 2 MiB/s
