"""Plan runs as text: the test-run timeline and the cutover steps. Phases are letters (C
convert, · wait, B boot, R ready), so the chart reads on a monochrome console. Pure functions
over the run rows of issue 6's API (appliance/plans: runner.py, cutover.py).

Test-run report: machines {name: {rank, state, error, rto_s,
                                  phases {convert_s, wait_s, boot_s, ready_s}}}, totals {rto_s}.
Phases are durations; a machine's conversion starts at rto - (sum of its phases).
Cutover report: steps [{step, state, seconds, at, detail}], next, stopped_wall,
all_ready_wall, downtime_s; the run row's state is awaiting | running | failed |
interrupted | rolling-back | committed | rolled-back.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tui import format as fmt

PHASES = (("convert_s", "C"), ("wait_s", "·"), ("boot_s", "B"), ("ready_s", "R"))
# (step, what it does, asks for a confirmation, asks to type the plan name)
CUTOVER_STEPS = (
    ("preflight", "Preflight: plan, points, sources", False, False),
    ("final-delta", "One more sync, sources still up", True, False),
    ("stop-source", "STOP the sources: downtime starts", True, True),
    ("last-delta", "Copy what changed until the stop", False, False),
    ("seal", "Seal the points that will boot", False, False),
    ("bring-up", "Convert, boot, readiness checks", False, False),
    ("commit", "COMMIT: targets stay, sources off", True, True),
)
STEP_MARK = {
    "done": "✓",
    "running": "▶",
    "failed": "✗",
    "awaiting": "?",
    "waiting": "·",
    "rolled-back": "↶",
    "skipped": "-",
}
WAITING_FOR_OPERATOR = ("awaiting", "failed", "interrupted")


def _machines(report: dict[str, Any]) -> list[dict[str, Any]]:
    ms = report.get("machines") or {}
    rows = list(ms.values()) if isinstance(ms, dict) else list(ms)
    return sorted(rows, key=lambda m: (m.get("rank", 0), m.get("machine", "")))


def _segments(m: dict[str, Any]) -> tuple[float, list[tuple[str, float]]]:
    ph = m.get("phases") or {}
    segs = [(letter, float(ph[k])) for k, letter in PHASES if ph.get(k) is not None]
    spent = sum(d for _, d in segs)
    start = max(0.0, float(m["rto_s"]) - spent) if m.get("rto_s") is not None else 0.0
    return start, segs


def timeline_rows(run: dict[str, Any], width: int) -> list[tuple[str, str, str, str, str]]:
    """(machine, rank, RTO, state, bar) per machine; every bar on the same time axis."""
    rep = run.get("report") or {}
    machines = _machines(rep)
    spans = [_segments(m) for m in machines]
    total = max([s + sum(d for _, d in segs) for s, segs in spans] + [1.0])
    rows = []
    for m, (start, segs) in zip(machines, spans, strict=True):
        cells = [" "] * width
        t = start
        for letter, d in segs:
            a = int(t / total * width)
            b = max(a + 1, int((t + d) / total * width)) if d > 0 else a
            for i in range(a, min(width, b)):
                cells[i] = letter
            t += d
        state = m.get("state", "")
        mark = {"ready": "✓ ready", "failed": "✗ FAILED"}.get(state, f"▶ {state or 'pending'}")
        rows.append(
            (
                m.get("machine", "?"),
                str(m.get("rank", "?")),
                fmt.duration(m.get("rto_s")),
                mark,
                "".join(cells),
            )
        )
    return rows


def run_rto(run: dict[str, Any]) -> float | None:
    rep = run.get("report") or {}
    return (rep.get("totals") or {}).get("rto_s")


def cutover_steps(run: dict[str, Any] | None) -> list[tuple[str, str, str, bool, float | None]]:
    """(step, what, state, typed confirmation, seconds) for every step, in order."""
    rep = (run or {}).get("report") or {}
    done = {e["step"]: e for e in rep.get("steps", [])}  # the last entry of a step wins
    out = []
    for step, label, _confirm, typed in CUTOVER_STEPS:
        entry = done.get(step) or {}
        state = entry.get("state", "waiting")
        if run and run.get("state") == "running" and run.get("step") == step:
            state = "running"
        elif (
            run
            and run.get("state") in WAITING_FOR_OPERATOR
            and run.get("next") == step
            and state != "failed"
        ):
            state = "awaiting"
        out.append((step, label, state, typed, entry.get("seconds")))
    return out


def next_step(run: dict[str, Any] | None) -> str | None:
    """The step that waits for the operator, if any."""
    if run and run.get("state") in WAITING_FOR_OPERATOR:
        return run.get("next") or (run.get("report") or {}).get("next")
    return None


def downtime_s(run: dict[str, Any] | None, now: datetime) -> tuple[float | None, bool]:
    """Seconds from source stop to all ready (or to now); and whether the clock still runs."""
    rep = (run or {}).get("report") or {}
    if rep.get("downtime_s") is not None:
        return float(rep["downtime_s"]), False
    if rep.get("stopped_wall"):
        running = (run or {}).get("state") not in ("rolled-back", "committed")
        return now.timestamp() - float(rep["stopped_wall"]), running
    return None, False
