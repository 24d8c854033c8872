"""Readiness checks: when is a booted machine really up?

    console  a regex on the serial console log (the file libvirt writes), read from the start
    agent    the QEMU guest agent answers guest-ping
    tcp      a TCP connect to address:port succeeds (from the appliance)
    delay    a fixed wait (for services that announce nothing)

Each check has its own timeout and fails early when waiting is pointless: the domain has
stopped, or the console shows a line after which a guest never comes up (kernel panic, the
initramfs shell, "Gave up waiting for root"). The result says how long it took and why it
failed, for the report.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.convert.boot import FAILURE_PATTERNS
from appliance.plans import virt
from appliance.plans.model import Check

POLL_S = 0.25  # between two looks at a console file or a port: small against a 30 s boot
TCP_CONNECT_TIMEOUT_S = 2.0


@dataclass
class CheckResult:
    check: str  # the check's label, e.g. "console /FERRYMAN-BOOT-OK/"
    type: str
    passed: bool
    seconds: float
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _console_failure(text: str) -> str | None:
    for pat in FAILURE_PATTERNS:
        m = pat.search(text)
        if m:
            start = text.rfind("\n", 0, m.start()) + 1
            end = text.find("\n", m.end())
            return text[start : end if end >= 0 else len(text)].strip()
    return None


def run_check(
    check: Check,
    *,
    conn: Any,
    domain: str,
    console: Path,
    cancel: threading.Event,
    clock: Callable[[], float] = time.monotonic,
) -> CheckResult:
    """Wait for one check; never raises for a failed check (the result says why)."""
    t0 = clock()
    deadline = t0 + check.timeout_s

    def result(ok: bool, detail: str) -> CheckResult:
        return CheckResult(check.label, check.type, ok, round(clock() - t0, 2), detail)

    if check.type == "delay":
        if cancel.wait(check.seconds):
            return result(False, "cancelled")
        return result(True, f"waited {check.seconds} s")

    pattern = re.compile(check.pattern or "") if check.type == "console" else None
    last_why = "not tried yet"
    while True:
        if cancel.is_set():
            return result(False, "cancelled")
        state = virt.domain_state(conn, domain)
        if state not in ("running", "paused"):
            return result(False, f"domain {domain} is {state}")
        if pattern is not None:
            text = console.read_text(errors="replace") if console.exists() else ""
            m = pattern.search(text)
            if m:
                line_end = text.find("\n", m.end())
                line = text[m.start() : line_end if line_end >= 0 else len(text)].strip()
                return result(True, line[:200])
            bad = _console_failure(text)
            if bad:
                return result(False, f"the console shows: {bad[:200]}")
            last_why = "no match on the console yet"
        elif check.type == "agent":
            why = virt.agent_ping(conn, domain, timeout_s=2)
            if why is None:
                return result(True, "guest-ping answered")
            last_why = why
        elif check.type == "tcp":
            try:
                with socket.create_connection(
                    (str(check.address), int(check.port or 0)), timeout=TCP_CONNECT_TIMEOUT_S
                ):
                    return result(True, f"connected to {check.address}:{check.port}")
            except OSError as e:
                last_why = f"connect to {check.address}:{check.port}: {e.strerror or e}"
        if clock() >= deadline:
            return result(False, f"timeout after {check.timeout_s} s ({last_why})")
        time.sleep(POLL_S)
