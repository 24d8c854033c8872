"""The planning calculator: how long the first copy takes, how often incrementals can run,
and which RPO one can honestly promise. Pure functions, so they can be tested and reused by
the CLI.

Model (the "simple calculator" migration engineers use, made explicit):
- effective throughput = link speed x efficiency (protocol overhead, WAN, source load);
- the initial sync moves all *used* data once;
- changes arrive evenly over the day (daily change rate x data size / 86 400 s); an incremental
  taken every I seconds moves I seconds worth of change, plus a fixed per-sync overhead
  (snapshot, block status, seal, release);
- the cadence is the shortest interval whose sync fits in HEADROOM of that interval, leaving
  room for bursts; the promised RPO is the worst age of the newest restore point, i.e. one
  interval plus one sync.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

DAY_S = 86_400
HEADROOM = 0.5  # an incremental may use at most half its interval: bursts double the change
MIN_CADENCE_S = 60  # the daemon refuses RPO targets below a minute
NICE_STEPS_S = (60, 120, 300, 600, 900, 1800, 3600, 7200, 14_400, 21_600, 43_200, DAY_S)

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_LINK_UNITS = {
    "bit/s": 1,
    "bps": 1,
    "kbit/s": 1e3,
    "kbps": 1e3,
    "mbit/s": 1e6,
    "mbps": 1e6,
    "m": 1e6,
    "gbit/s": 1e9,
    "gbps": 1e9,
    "g": 1e9,
    "": 1e6,
}
_NUM = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z/]*)\s*$")


class InputError(ValueError):
    """A value the operator typed that cannot be used; the message says what to type."""


def parse_size(text: str) -> int:
    m = _NUM.match(text or "")
    if not m:
        raise InputError("type a size such as 500 GiB or 2 TB")
    unit = m.group(2).lower()
    if unit not in _SIZE_UNITS:
        raise InputError(f"unknown unit '{m.group(2)}': use GiB, TiB, GB or TB")
    value = int(float(m.group(1)) * _SIZE_UNITS[unit])
    if value <= 0:
        raise InputError("the size must be more than zero")
    return value


def parse_link(text: str) -> float:
    """Link speed in bits per second ('1 Gbit/s', '100 Mbps', '250' = Mbit/s)."""
    m = _NUM.match(text or "")
    if not m:
        raise InputError("type a speed such as 1 Gbit/s or 100 Mbit/s")
    unit = m.group(2).lower()
    if unit not in _LINK_UNITS:
        raise InputError(f"unknown unit '{m.group(2)}': use Mbit/s or Gbit/s")
    value = float(m.group(1)) * _LINK_UNITS[unit]
    if value <= 0:
        raise InputError("the link speed must be more than zero")
    return value


def parse_percent(text: str, *, low: float = 0.0, high: float = 100.0) -> float:
    """A percentage as a fraction; 'low' is exclusive."""
    t = (text or "").strip().rstrip("%").strip()
    try:
        v = float(t)
    except ValueError:
        raise InputError("type a number of percent, e.g. 70") from None
    if not low < v <= high:
        raise InputError(f"use a value above {low:g} and at most {high:g} %")
    return v / 100.0


@dataclass(frozen=True)
class Plan:
    throughput_Bps: float  # effective, bytes per second
    initial_sync_s: float
    change_Bps: float  # average rate of change, bytes per second
    utilisation: float  # change rate / throughput: above HEADROOM no cadence fits
    cadence_s: float | None  # None: the link cannot keep up with the change rate
    incremental_s: float | None
    promised_rpo_s: float | None
    verdict: str


def incremental_s(
    interval_s: float, change_Bps: float, throughput_Bps: float, overhead_s: float
) -> float:
    return overhead_s + interval_s * change_Bps / throughput_Bps


def nice_up(seconds: float) -> float:
    for step in NICE_STEPS_S:
        if seconds <= step:
            return float(step)
    return float(math.ceil(seconds / DAY_S) * DAY_S)


def plan(
    data_bytes: int,
    link_bps: float,
    efficiency: float,
    daily_change: float,
    overhead_s: float = 30.0,
) -> Plan:
    """efficiency and daily_change are fractions (0.7 = 70 %)."""
    throughput = link_bps / 8.0 * efficiency
    initial = data_bytes / throughput
    change = data_bytes * daily_change / DAY_S
    util = change / throughput
    if util >= HEADROOM:
        return Plan(
            throughput,
            initial,
            change,
            util,
            None,
            None,
            None,
            f"the link cannot keep up: changes need {util:.0%} of it (at most "
            f"{HEADROOM:.0%} leaves room for bursts); add bandwidth or lower the "
            "change rate",
        )
    # overhead + I*util <= HEADROOM*I  =>  I >= overhead / (HEADROOM - util)
    cadence = nice_up(max(MIN_CADENCE_S, overhead_s / (HEADROOM - util)))
    inc = incremental_s(cadence, change, throughput, overhead_s)
    rpo = nice_up(cadence + inc)
    return Plan(
        throughput,
        initial,
        change,
        util,
        cadence,
        inc,
        rpo,
        f"sync every {int(cadence)} s; promise an RPO of {int(rpo)} s",
    )
