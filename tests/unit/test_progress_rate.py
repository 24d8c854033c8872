"""Progress on a link that slows down or stops (reliability row 5): the rate is measured over
the window that ends now, so it falls and the ETA grows while nothing completes; it never
freezes at the last fast value."""

from __future__ import annotations

import pytest

from appliance.daemon.jobs import Progress


def test_rate_falls_and_eta_grows_while_nothing_completes() -> None:
    t = [0.0]
    p = Progress(clock=lambda: t[0])
    p.set_total(100 * 1000)
    for _ in range(20):  # 1000 units a second for 20 s
        t[0] += 1.0
        p.update(1000)
    fast = p.snapshot()
    assert fast["rate"] == pytest.approx(1000.0) and fast["eta_s"] == pytest.approx(80.0)
    etas = []
    for _ in range(30):  # then nothing for 30 s (a request of a slow link in flight)
        t[0] += 1.0
        s = p.snapshot()
        assert s["done"] == 20_000 and s["rate"] < fast["rate"]
        etas.append(s["eta_s"])
    assert etas == sorted(etas) and etas[-1] > 10 * fast["eta_s"]
    # A completion after the pause: the rate is that step over the time it took.
    p.update(1000)
    s = p.snapshot()
    assert s["rate"] == pytest.approx(3000 / 32.0)


def test_rate_follows_a_slower_link() -> None:
    t = [0.0]
    p = Progress(clock=lambda: t[0])
    p.set_total(10**6)
    for _ in range(10):
        t[0] += 0.5
        p.update(500)  # 1000/s
    for _ in range(20):
        t[0] += 2.0
        p.update(250)  # 125/s: 8x slower
    s = p.snapshot()
    assert s["rate"] == pytest.approx(125.0, rel=0.3)
