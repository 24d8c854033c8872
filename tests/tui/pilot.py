"""Small helpers for pilot tests: wait for a condition while the app runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from textual.pilot import Pilot
from textual.widgets import DataTable, Static

WAIT_S = 20.0  # a loaded 2-core machine; a real daemon answers in milliseconds otherwise


async def until(
    pilot: Pilot[Any], cond: Callable[[], Any], what: str, timeout: float = WAIT_S
) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = cond()
        except Exception:
            value = None
        if value:
            return value
        await pilot.pause(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for: {what}")


def notes(app: Any) -> list[tuple[str, str]]:
    return [(n.title, n.message) for n in app._notifications]


def note_titled(app: Any, title: str) -> tuple[str, str] | None:
    return next(((t, m) for t, m in notes(app) if title in t), None)


def cells(table: DataTable[Any], row_key: str) -> list[str]:
    return [str(c) for c in table.get_row(row_key)]


def column(table: DataTable[Any], index: int) -> list[str]:
    return [str(table.get_row_at(r)[index]) for r in range(table.row_count)]


def text_of(static: Static) -> str:
    return str(static.render())
