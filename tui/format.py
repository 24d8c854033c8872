"""Words and symbols for what the screens show.

State is never carried by colour alone: a serial console may be monochrome, and an engineer
reading a screenshot later sees no colour either. Every status has a word and a symbol.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

SPARK_CHARS = "▁▂▃▄▅▆▇█"

# status -> (symbol, word); symbols are plain Unicode that every console font has
RPO_WORDS = {
    "within": ("✓", "within"),
    "near": ("!", "NEAR"),
    "over": ("✗", "OVER"),
    "none": ("-", "no RPO"),
}
JOB_STATES = {
    "queued": "… queued",
    "running": "▶ running",
    "succeeded": "✓ ok",
    "failed": "✗ FAILED",
    "cancelled": "■ cancelled",
    "interrupted": "✗ interrupted",
}
LEVELS = {"info": "i info", "warning": "! WARN", "error": "✗ ERROR"}


def parse_ts(ts: str | None) -> datetime | None:
    if not ts:
        return None
    d = datetime.fromisoformat(ts)
    return d if d.tzinfo else d.replace(tzinfo=UTC)


def age_s(ts: str | None, now: datetime) -> float | None:
    d = parse_ts(ts)
    return None if d is None else max(0.0, (now - d).total_seconds())


def duration(seconds: float | None) -> str:
    """Compact: 45s, 12m, 2h05m, 3d04h. Never more than 6 characters."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s" if s < 600 else f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def short(seconds: float | None) -> str:
    """Coarser, for ages and targets side by side: 45s, 9m, 2h05m, 3d04h."""
    if seconds is None:
        return "-"
    s = round(seconds)
    if 60 <= s < 3600:
        return f"{round(s / 60)}m"
    if s >= 2 * 86400:
        return f"{s // 86400}d"
    if s >= 3600 and s % 3600 == 0 and s < 100 * 3600:
        return f"{s // 3600}h"
    return duration(s)


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= div:
            v = n / div
            return f"{v:.1f} {unit}" if v < 100 else f"{v:.0f} {unit}"
    return f"{int(n)} B"


def rate(bps: float | None) -> str:
    """Bytes per second, short: 112M/s."""
    if not bps:
        return "-"
    for unit, div in (("G", GiB), ("M", MiB), ("K", KiB)):
        if bps >= div:
            v = bps / div
            return f"{v:.1f}{unit}/s" if v < 10 else f"{v:.0f}{unit}/s"
    return f"{bps:.0f}B/s"


def bar(fraction: float | None, width: int) -> str:
    """A text progress bar that reads without colour: ████▌░░░."""
    if fraction is None or width <= 0:
        return "░" * max(width, 0)
    f = min(max(fraction, 0.0), 1.0)
    full = int(f * width)
    half = (f * width - full) >= 0.5 and full < width
    return "█" * full + ("▌" if half else "") + "░" * (width - full - (1 if half else 0))


def sparkline(values: Sequence[float], width: int) -> str:
    """The last `width` values scaled to their own maximum; blank when there is nothing."""
    vals = list(values)[-width:]
    if not vals:
        return " " * width
    top = max(vals) or 1.0
    out = "".join(SPARK_CHARS[min(7, int(v / top * 7.999))] if v > 0 else " " for v in vals)
    return out.rjust(width)


def rpo_words(status: str, age: float | None, rpo_s: int | None) -> str:
    """'✓ within 4m/15m': symbol, word, newest restore point age against the target."""
    sym, word = RPO_WORDS.get(status, ("?", status))
    if status == "none":
        return f"{sym} {word}" if age is None else f"{sym} {short(age)} old"
    return f"{sym} {word} {short(age) if age is not None else 'never'}/{short(rpo_s)}"


def job_state(state: str) -> str:
    return JOB_STATES.get(state, state)


def level(lv: str) -> str:
    return LEVELS.get(lv, lv)


def clock(ts: str | None, now: datetime) -> str:
    """HH:MM:SS today, 'MM-DD HH:MM' before (times shown in UTC, said in docs/tui.md)."""
    d = parse_ts(ts)
    if d is None:
        return "-"
    d = d.astimezone(UTC)
    if d.date() == now.astimezone(UTC).date():
        return d.strftime("%H:%M:%S")
    return d.strftime("%m-%d %H:%M")
