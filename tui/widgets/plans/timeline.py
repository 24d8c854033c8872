"""Timelines of plan runs as text. Phases are letters (C convert, B boot, R ready-wait), so the
chart reads on a monochrome console; pure functions, tested on their own.

The report layout read here (plan_runs.report, written by issue 6's runner):
  {"machines": [{"machine", "rank", "state", "error", "rto_s",
                 "phases": {"convert"|"boot"|"ready": {"start", "end"}}}],
   "rto_s", "started_at"}
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tui import format as fmt

PHASES = (("convert", "C"), ("boot", "B"), ("ready", "R"))
CUTOVER_STEPS = (
    ("preflight", "Preflight: sources, restore points, conversion verdicts", False),
    ("final-delta", "Final delta while the sources still run", False),
    ("stop-source", "STOP the source machines (downtime starts)", True),
    ("last-delta", "Last delta from the stopped sources", False),
    ("seal", "Seal the last restore points", False),
    ("convert", "Convert for KVM", False),
    ("boot", "Boot by plan on the production networks", False),
    ("readiness", "Readiness checks", False),
    ("commit", "COMMIT: sources stay off, replication ends", True),
)
STEP_MARK = {"done": "✓", "running": "▶", "failed": "✗", "rolled-back": "↶", "waiting": "·"}


def _span(run: dict[str, Any], now: datetime) -> tuple[datetime, float]:
    rep = run.get("report") or {}
    start = fmt.parse_ts(rep.get("started_at") or run.get("started_at")) or now
    end = fmt.parse_ts(run.get("ended_at")) or now
    for m in rep.get("machines", []):
        for ph in (m.get("phases") or {}).values():
            e = fmt.parse_ts(ph.get("end")) or (now if ph.get("start") else None)
            if e and e > end:
                end = e
    return start, max(1.0, (end - start).total_seconds())


def timeline_rows(run: dict[str, Any], width: int, now: datetime) -> list[tuple[str, ...]]:
    """(machine, rank, bar, RTO, state) per machine; the bar spans the whole run."""
    start, total = _span(run, now)
    rows = []
    machines = sorted(
        (run.get("report") or {}).get("machines", []),
        key=lambda m: (m.get("rank", 0), m.get("machine", "")),
    )
    for m in machines:
        cells = [" "] * width
        for phase, letter in PHASES:
            ph = (m.get("phases") or {}).get(phase) or {}
            s = fmt.parse_ts(ph.get("start"))
            if s is None:
                continue
            e = fmt.parse_ts(ph.get("end")) or now
            a = int((s - start).total_seconds() / total * width)
            b = max(a + 1, int((e - start).total_seconds() / total * width))
            for i in range(max(0, a), min(width, b)):
                cells[i] = letter if ph.get("end") else letter.lower()
        state = m.get("state", "")
        mark = {"ready": "✓ ready", "failed": "✗ FAILED"}.get(state, f"▶ {state or 'waiting'}")
        rows.append(
            (
                m.get("machine", "?"),
                str(m.get("rank", "?")),
                "".join(cells),
                fmt.duration(m.get("rto_s")),
                mark,
            )
        )
    return rows


def cutover_steps(run: dict[str, Any] | None) -> list[tuple[str, str, str, bool]]:
    """(step, label, state, needs typed confirmation) for every step of the cutover."""
    steps = ((run or {}).get("report") or {}).get("steps", {})
    out = []
    for step, label, typed in CUTOVER_STEPS:
        state = (steps.get(step) or {}).get("state", "waiting")
        out.append((step, label, state, typed))
    return out


def next_step(run: dict[str, Any] | None) -> str | None:
    for step, _, state, _ in cutover_steps(run):
        if state in ("waiting", "failed"):
            return step
        if state == "running":
            return None
    return None


def downtime_s(run: dict[str, Any] | None, now: datetime) -> tuple[float | None, bool]:
    """Seconds from source stop to all ready (or now); and whether the clock still runs."""
    rep = (run or {}).get("report") or {}
    stopped = fmt.parse_ts(rep.get("source_stopped_at"))
    if stopped is None:
        return None, False
    ready = fmt.parse_ts(rep.get("all_ready_at"))
    return ((ready or now) - stopped).total_seconds(), ready is None
