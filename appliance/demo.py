"""scripts/demo: the main job on the built-in lab.

Starts ferrymand (detached: it owns the jobs, so closing the TUI stops nothing), then opens
the TUI, or with --headless prints each step with its timing. The lab itself (a libvirt guest
that keeps writing, protected with a short RPO) is added by the demo-lab work.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from appliance.client import Client
from appliance.config import paths
from appliance.errors import FerrymanError

READY_TIMEOUT_S = 60.0


def step(name: str, start: float) -> None:
    print(f"[{time.monotonic() - start:6.1f} s] {name}", flush=True)


def ensure_daemon() -> tuple[dict[str, object], bool]:
    """Return the daemon's health, starting ferrymand first when none answers."""
    try:
        with Client() as c:
            return c.health(), False
    except FerrymanError:
        pass
    p = paths()
    p.log_dir.mkdir(parents=True, exist_ok=True)
    log = p.log_dir / "ferrymand.log"
    ferrymand = Path(sys.executable).parent / "ferrymand"
    with open(p.log_dir / "ferrymand.stderr", "ab") as err:
        subprocess.Popen(
            [str(ferrymand), "--log-file", str(log)],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    end = time.monotonic() + READY_TIMEOUT_S
    last: FerrymanError | None = None
    while time.monotonic() < end:
        try:
            with Client() as c:
                return c.health(), True
        except FerrymanError as e:
            last = e
            time.sleep(0.2)
    raise FerrymanError(
        f"ferrymand did not start within {READY_TIMEOUT_S:.0f} s: {last}",
        hint=f"read {log} and {p.log_dir / 'ferrymand.stderr'}",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/demo")
    ap.add_argument("--headless", action="store_true", help="no TUI; print each step")
    args = ap.parse_args(argv)
    start = time.monotonic()
    try:
        health, started = ensure_daemon()
    except FerrymanError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    step(
        f"ferrymand {'started' if started else 'already running'} (pid {health['pid']}, "
        f"store {health['store']})",
        start,
    )
    if args.headless:
        step("headless: nothing more to show until the lab exists", start)
        return 0
    step("opening the TUI (q quits; ferrymand keeps running)", start)
    ferryman = Path(sys.executable).parent / "ferryman"
    os.execv(str(ferryman), [str(ferryman)])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
