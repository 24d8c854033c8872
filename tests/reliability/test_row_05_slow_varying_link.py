"""Row 5: a slow link whose speed changes during the copy. The source is nbdkit serving a raw
file through --filter=rate; its rate-file is rewritten mid-sync: 8 Mbit/s, then 1 Mbit/s
(one 1 MiB request takes 8 s), then fast again. A real ferrymand copies it.

What must hold: no false timeouts (no stall, reconnect or retry; under load a 1 MiB request
took up to 27 s here), progress that only grows, a rate and ETA that follow the link (the ETA
grows when the link slows, never promises more than the link can carry, and the copy ends
long before it once the link is fast again), and a restore point equal to the source. The
rate is measured over the window that ends now (appliance/daemon/jobs.py): it used to freeze
at the last fast value while no request completed, and the ETA with it."""

from __future__ import annotations

import math
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.units import MiB
from tests.datapath_fixtures import *  # noqa: F403
from tests.helpers.daemon import Daemon, Env
from tests.helpers.nbdsrc import assert_equal, cli, point_path

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(300)]

SIZE = 48 * MiB


def _set_rate(path: Path, rate: str) -> None:
    """As nbdkit-rate-filter(1) asks: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(rate + "\n")
    os.replace(tmp, path)


def _poll(env: Env, job: int, samples: list[dict[str, Any]]) -> dict[str, Any]:
    j = cli(env, "job", "show", str(job))
    samples.append({"t": time.monotonic(), "state": j["state"], **(j.get("progress") or {})})
    return j


def test_row_05_rate_rewritten_mid_copy(
    daemon: Daemon, fm_env: Env, nbdkit_server, dp_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    img = dp_dir / "source.raw"
    img.write_bytes(os.urandom(SIZE))
    rate = dp_dir / "rate"
    _set_rate(rate, "8M")
    srv = nbdkit_server("--filter=rate", "file", str(img), "rate=8M", f"rate-file={rate}")
    cli(fm_env, "source", "add", "wan", "--kind", "nbd", "--uri", srv.uri, "--param", "name=db01")
    cli(fm_env, "discover", "wan", "--wait")
    cli(fm_env, "protect", "db01")
    job = cli(fm_env, "sync", "db01")["id"]

    samples: list[dict[str, Any]] = []
    phases: dict[str, tuple[float, float]] = {}

    def run_until(pred: Any, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            j = _poll(fm_env, job, samples)
            if pred(samples[-1]) or j["state"] not in ("queued", "running"):
                return
            time.sleep(0.5)
        raise AssertionError(f"timed out; last sample {samples[-1]}")

    t0 = time.monotonic()
    run_until(lambda s: (s.get("done") or 0) >= 3 * MiB, 60)
    phases["fast"] = (t0, time.monotonic())
    _set_rate(rate, "1M")  # 128 KiB/s
    t1 = time.monotonic()
    at_switch = samples[-1]["done"]
    # Five 1 MiB steps at 8 s each; the rate is read once three of them came in.
    run_until(lambda s: (s.get("done") or 0) >= at_switch + 5 * MiB, 90)
    phases["slow"] = (t1, time.monotonic())
    _set_rate(rate, "200M")
    t2 = time.monotonic()
    run_until(lambda s: s["state"] == "succeeded", 120)
    phases["fast again"] = (t2, time.monotonic())

    j = cli(fm_env, "job", "show", str(job))
    assert j["state"] == "succeeded" and j["attempts"] == 1, j
    stats = j["result"]["disks"][0]["stats"]
    assert (stats["stalls"], stats["reconnects"], stats["retries"]) == (0, 0, 0), stats
    assert stats["bytes_read"] == SIZE

    running = [s for s in samples if s["state"] == "running" and s.get("phase") == "copying"]
    done = [s["done"] for s in running]
    assert done == sorted(done), "progress went backwards"
    assert all(s.get("phase") != "stalled" for s in samples)
    for s in running:
        if s.get("eta_s") is not None:
            assert math.isfinite(s["eta_s"]) and s["eta_s"] >= 0, s

    def during(name: str, skip: float) -> list[dict[str, Any]]:
        a, b = phases[name]
        return [s for s in running if a + skip <= s["t"] <= b and s.get("rate")]

    fast = during("fast", 1.0)
    slow = [s for s in during("slow", 0.0) if s["done"] >= at_switch + 3 * MiB]
    assert fast and slow, samples
    fast_rate = max(s["rate"] for s in fast)
    # The rate follows the link down (8 -> 1 Mbit/s = 128 KiB/s) ...
    assert all(s["rate"] < fast_rate / 2.5 for s in slow), (fast_rate, slow)
    assert all(16 * 1024 < s["rate"] < 256 * 1024 for s in slow), slow
    # ... and so does the ETA: never sooner than the link allows, never absurdly later.
    link = 1_000_000 / 8
    for s in slow:
        floor = (SIZE - s["done"]) / link
        assert 0.7 * floor <= s["eta_s"] <= 8 * floor, (s, floor)
    assert slow[-1]["eta_s"] > 2.5 * fast[-1]["eta_s"]
    # ... and up again: the copy ended far sooner than the slow ETA said, once fast.
    assert phases["fast again"][1] - phases["fast again"][0] < slow[-1]["eta_s"] / 4

    p, _ = point_path(fm_env, "db01")
    assert_equal(img, p)
    con = sqlite3.connect(fm_env.db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
