"""Benchmarks of the TUI: event-loop lag while a sync runs, and start-up to a drawn dashboard.

tui_loop_lag_p99_ms
    The TUI (dashboard, refreshing once a second as in production) runs headless in this
    process against a real ferrymand whose store holds 500 protected machines, while that
    daemon runs a real full sync at full speed (nbdkit sparse-random source, 8 GiB with 25 %
    data, into a qcow2 chain through the replication engine). A probe task on the TUI's own
    asyncio loop asks to wake every 10 ms and records how late it wakes; ours is the p99 of
    that lateness during the sync. reference: the same probe with the daemon idle (no sync).
    Goal: ours <= 50 ms.
tui_startup_500_s
    `ferryman` started in a real terminal (tmux 160x48) against a daemon with 500 protected
    machines; ours is the wall time from starting it to the screen showing the dashboard's
    summary line for the 500 (read with capture-pane every 20 ms). reference: `ferryman
    machines --json` on the same daemon: Python start, imports and the same API call without a
    UI, the floor under ours. Goal: ours <= 1.5 s.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IDS = ["tui_loop_lag_p99_ms", "tui_startup_500_s"]
MACHINES = 500
SYNC_SIZE = "8G"
PROBE_S = 0.010  # the probe asks to wake every 10 ms
LAG_GOAL_MS = 50.0
STARTUP_GOAL_S = 1.5
BIN = Path(sys.executable).parent


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values)


async def _probe(stop: asyncio.Event, out: list[float]) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t = loop.time()
        await asyncio.sleep(PROBE_S)
        out.append((loop.time() - t - PROBE_S) * 1000.0)


async def _bare_lag(until: Any) -> list[float]:
    lags: list[float] = []
    stop = asyncio.Event()
    task = asyncio.create_task(_probe(stop, lags))
    start = time.monotonic()
    while time.monotonic() - start < 3.0 or not await asyncio.to_thread(until):
        await asyncio.sleep(1.0)
        if time.monotonic() - start > 300:
            break
    stop.set()
    await task
    return lags


async def _lag_during(env: Any, until: Any, min_s: float) -> tuple[list[float], float, float]:
    """Run the dashboard headless; probe lag until until() is true (and at least min_s).
    Returns the lags, the event-loop thread's CPU ms per wall second and the seconds."""
    from tests.tui.conftest import make_app
    from tui.widgets.dashboard.machine_table import MachineTable

    app = make_app(env, refresh_s=1.0)
    lags: list[float] = []
    async with app.run_test(size=(160, 48)) as pilot:
        table = app.screen.query_one(MachineTable)
        while table.row_count < MACHINES:
            await pilot.pause(0.05)
        stop = asyncio.Event()
        task = asyncio.create_task(_probe(stop, lags))
        start, cpu0 = time.monotonic(), time.thread_time()  # this thread runs the TUI's loop
        while time.monotonic() - start < min_s or not await asyncio.to_thread(until):
            await asyncio.sleep(1.0)
            if time.monotonic() - start > 300:
                break
        stop.set()
        await task
        secs = time.monotonic() - start
        return lags, (time.thread_time() - cpu0) * 1000.0 / secs, secs


def _loop_lag(env: Any, tmp: Path) -> dict[str, Any]:
    from appliance.client import Client

    base, base_cpu, _ = asyncio.run(_lag_during(env, lambda: True, 8.0))
    sock = tmp / "src.sock"
    subprocess.run(
        [
            "nbdkit",
            "--unix",
            str(sock),
            "--pidfile",
            str(tmp / "nbdkit.pid"),
            "sparse-random",
            SYNC_SIZE,
            "percent=25",
            "seed=11",
        ],
        check=True,
        timeout=30,
    )
    pidfile, end = tmp / "nbdkit.pid", time.monotonic() + 30
    while not pidfile.exists() and time.monotonic() < end:  # the daemon writes it, late
        time.sleep(0.05)  # when the host is loaded
    pid = int(pidfile.read_text())
    try:
        with Client(env.socket, user="bench") as c:
            c.add_source("benchsrc", "nbd", f"nbd+unix:///?socket={sock}")
            c.wait(c.discover("benchsrc")["id"], timeout=60)
            c.protect("benchsrc", rpo_seconds=3600)
            job = c.sync("benchsrc", full=True)

            poll = Client(env.socket, user="bench")  # one client: building one costs CPU

            def done() -> bool:
                return poll.job(job["id"])["state"] not in ("queued", "running")

            lags, cpu_ms, secs = asyncio.run(_lag_during(env, done, 3.0))
            final = c.job(job["id"])
            # the same probe on a bare asyncio loop (no TUI) during a second full sync: what
            # the host gives any process while the copy runs
            job = c.sync("benchsrc", full=True)
            bare = asyncio.run(_bare_lag(done))
        res = final.get("result") or {}
        moved = res.get("bytes_written") or 0
    finally:
        os.kill(pid, 15)
    ours, ref = p99(lags), p99(base)
    return {
        "id": "tui_loop_lag_p99_ms",
        "ours": round(ours, 1),
        "reference": round(ref, 1),
        "ratio": round(ours / ref, 2) if ref > 0 else None,
        "goal": LAG_GOAL_MS,
        "unit": "ms",
        "detail": f"p99 lateness of a 10 ms timer on the TUI loop (dashboard of {MACHINES} "
        f"machines, refresh 1 s) during a real full sync: job {final['state']}, "
        f"{moved / 2**30:.2f} GiB written in {secs:.1f} s of probing "
        f"({len(lags)} samples, max {max(lags):.1f} ms, median "
        f"{statistics.median(lags):.1f} ms); reference = same probe, daemon idle "
        f"({len(base)} samples, max {max(base):.1f} ms); a bare asyncio loop without the TUI "
        f"during a second full sync: p99 {p99(bare):.1f} ms. CPU of the TUI's event-loop "
        f"thread: {cpu_ms:.0f} ms per second during the sync, {base_cpu:.0f} ms/s idle (what "
        f"a loaded host does not hide); load average {_load()} on "
        f"{os.cpu_count()} cores. "
        f"{'MEETS' if ours <= LAG_GOAL_MS else 'MISSES'} the goal of "
        f"{LAG_GOAL_MS:.0f} ms.",
    }


def _startup(env: Any) -> dict[str, Any]:
    vars_ = {**os.environ, **env.vars(), "TERM": "xterm-256color"}
    ref_times = []
    for _ in range(3):
        t = time.monotonic()
        subprocess.run(
            [str(BIN / "ferryman"), "machines", "--json"],
            env=vars_,
            check=True,
            capture_output=True,
            timeout=60,
        )
        ref_times.append(time.monotonic() - t)
    times = []
    try:
        for i in range(3):
            sock_name = f"fm-bench-{os.getpid()}-{i}"  # a fresh tmux server per start
            tmux = ["tmux", "-L", sock_name]
            exports = " ".join(f"{k}={v}" for k, v in env.vars().items())
            t = time.monotonic()
            subprocess.run(
                [
                    *tmux,
                    "-f",
                    "/dev/null",
                    "new-session",
                    "-d",
                    "-s",
                    "b",
                    "-x",
                    "160",
                    "-y",
                    "48",
                    f"env {exports} {BIN / 'ferryman'}",
                ],
                check=True,
            )
            seen = ""
            while time.monotonic() - t < 30:
                seen = subprocess.run(
                    [*tmux, "capture-pane", "-p", "-t", "b"], capture_output=True, text=True
                ).stdout
                if f"{MACHINES} protected" in seen and "vm0000" in seen:
                    break
                time.sleep(0.02)
            times.append(time.monotonic() - t)
            subprocess.run([*tmux, "kill-server"], check=False)
            if f"{MACHINES} protected" not in seen:
                raise RuntimeError(f"the dashboard never showed {MACHINES} machines:\n{seen}")
    finally:
        for i in range(3):
            subprocess.run(
                ["tmux", "-L", f"fm-bench-{os.getpid()}-{i}", "kill-server"],
                check=False,
                capture_output=True,
            )
    ours, ref = statistics.median(times), statistics.median(ref_times)
    cpu = _startup_cpu(env)
    return {
        "id": "tui_startup_500_s",
        "ours": round(ours, 2),
        "reference": round(ref, 2),
        "ratio": round(ours / ref, 2),
        "goal": STARTUP_GOAL_S,
        "unit": "s",
        "detail": f"median of 3 starts of `ferryman` in tmux 160x48 until the dashboard shows "
        f"'{MACHINES} protected' and its first row ({', '.join(f'{x:.2f}' for x in times)}"
        f" s); reference = `ferryman machines --json` "
        f"({', '.join(f'{x:.2f}' for x in ref_times)} s). "
        f"{'MEETS' if ours <= STARTUP_GOAL_S else 'MISSES'} the goal of "
        f"{STARTUP_GOAL_S} s. CPU time of one start to the drawn dashboard (headless, "
        f"import included): {cpu:.2f} s; load average {_load()} on {os.cpu_count()} cores.",
    }


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


STARTUP_CPU = """
import asyncio, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tui.app import FerrymanApp
from tui.services import Services
from tui.widgets.dashboard.machine_table import MachineTable

async def main():
    app = FerrymanApp(Services(refresh_s=0))
    async with app.run_test(size=(160, 48)) as pilot:
        while app.screen.query_one(MachineTable).row_count < int(sys.argv[2]):
            await pilot.pause(0.01)
        await pilot.pause()
    print(time.process_time())

asyncio.run(main())
"""


def _startup_cpu(env: Any) -> float:
    """CPU seconds of one start (import, mount, load, draw): what a loaded host does not hide."""
    r = subprocess.run(
        [sys.executable, "-c", STARTUP_CPU, str(ROOT), str(MACHINES)],
        env={**os.environ, **env.vars()},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return float(r.stdout.strip().splitlines()[-1])


def run(ids: list[str]) -> list[dict[str, Any]]:
    from tests.helpers.daemon import Env, running_daemon
    from tests.tui.seed import many_machines

    if not shutil.which("tmux") or not shutil.which("nbdkit"):
        raise RuntimeError("needs tmux and nbdkit (scripts/setup installs them)")
    out = []
    with tempfile.TemporaryDirectory(prefix="fm-bench-tui-") as d:
        env = Env(Path(d))
        with running_daemon(env, "--no-probe", "--scheduler-tick", "86400"):
            many_machines(env.db, MACHINES)
            if "tui_startup_500_s" in ids:
                out.append(_startup(env))
            if "tui_loop_lag_p99_ms" in ids:
                out.append(_loop_lag(env, Path(d)))
    return sorted(out, key=lambda r: IDS.index(r["id"]))
