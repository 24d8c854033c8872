"""Every screen at 80x24 (the appliance console) and 160x48, against one seeded daemon.

Deterministic: the store is seeded at a fixed instant and the App's clock is pinned to it, the
scheduler sleeps, and the dashboard does not poll (refresh_s=0), so each picture depends only
on the code. Update after a deliberate change with: pytest tests/tui --snapshot-update
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static, TextArea

from tests.helpers.daemon import Env
from tests.tui.conftest import make_app
from tests.tui.pilot import text_of, until
from tui.screens.machine import MachineScreen
from tui.screens.source_form import SourceForm
from tui.widgets.common.fields import Field
from tui.widgets.dashboard.machine_table import MachineTable

pytestmark = [pytest.mark.tui, pytest.mark.timeout(300)]
SIZES = {"80x24": (80, 24), "160x48": (160, 48)}


def table_rows(pilot: Pilot[Any], selector: str) -> int:
    return pilot.app.screen.query_one(selector, DataTable).row_count


async def settle(pilot: Pilot[Any]) -> None:
    """Wait for the login (the nav bar shows who we are), then until two pictures 0.2 s
    apart are the same: layout passes after the data arrived have all landed."""
    await until(pilot, lambda: pilot.app.identity, "login")  # type: ignore[attr-defined]
    before = pilot.app.export_screenshot()
    for _ in range(50):
        await pilot.pause(0.2)
        now = pilot.app.export_screenshot()
        if now == before:
            break
        before = now
    for _ in range(3):
        await pilot.pause(0.05)


async def dashboard(pilot: Pilot[Any]) -> None:
    await until(
        pilot,
        lambda: (
            pilot.app.screen.query_one(MachineTable).row_count == 4
            and table_rows(pilot, "#events") == 5
            and table_rows(pilot, "#jobs") == 2
        ),
        "dashboard",
    )


async def machine(pilot: Pilot[Any]) -> None:
    await pilot.app.push_screen(MachineScreen("web01"))
    await until(
        pilot,
        lambda: table_rows(pilot, "#m-rps") == 6 and table_rows(pilot, "#m-jobs") == 6,
        "machine",
    )


async def sources(pilot: Pilot[Any]) -> None:
    await pilot.press("2")
    await until(
        pilot,
        lambda: table_rows(pilot, "#sources") == 2 and table_rows(pilot, "#src-machines") == 3,
        "sources",
    )


async def source_form(pilot: Pilot[Any]) -> None:
    await sources(pilot)
    await pilot.press("a")
    await until(pilot, lambda: isinstance(pilot.app.screen, SourceForm), "form")
    await pilot.press("ctrl+s")  # empty: every field says what is wrong


async def source_edit(pilot: Pilot[Any]) -> None:
    await sources(pilot)  # the first source (lab-nbd) is highlighted
    await pilot.press("e")
    await until(pilot, lambda: isinstance(pilot.app.screen, SourceForm), "edit form")
    pilot.app.screen.query_one("#field-throttle", Field).value = "fast"
    await pilot.press("ctrl+s")  # a wrong type: the field says so, nothing is sent


async def plans(pilot: Pilot[Any]) -> None:
    await pilot.press("3")
    await until(
        pilot,
        lambda: (
            "dr-main" in pilot.app.screen.query_one(TextArea).text
            and "valid" in text_of(pilot.app.screen.query_one("#pl-problems", Static))
        ),
        "plan",
    )


async def plan_diff(pilot: Pilot[Any]) -> None:
    await plans(pilot)
    await pilot.press("f4")


async def runs(pilot: Pilot[Any]) -> None:
    await pilot.press("4")
    await until(pilot, lambda: table_rows(pilot, "#tr-timeline") == 3, "timeline")


async def cutover(pilot: Pilot[Any]) -> None:
    await pilot.press("5")
    await until(
        pilot,
        lambda: (
            table_rows(pilot, "#co-steps") == 7
            and "00:06:00" in text_of(pilot.app.screen.query_one("#co-clock", Static))
        ),
        "cutover",
    )


async def calculator(pilot: Pilot[Any]) -> None:
    await pilot.press("6")
    await until(
        pilot,
        lambda: "promise" in text_of(pilot.app.screen.query_one("#calc-result", Static)),
        "calculator",
    )


async def events(pilot: Pilot[Any]) -> None:
    await pilot.press("7")
    await until(pilot, lambda: table_rows(pilot, "#ev-table") == 5, "events")


async def audit(pilot: Pilot[Any]) -> None:
    await events(pilot)
    # every App of this module logs in (real time): hide the sessions, keep the seed
    pilot.app.screen.query_one("#ev-filter", Input).value = "-login"
    await pilot.press("a")
    await until(pilot, lambda: table_rows(pilot, "#au-table") == 4, "audit")


SCREENS: dict[str, Callable[[Pilot[Any]], Awaitable[None]]] = {
    "dashboard": dashboard,
    "machine": machine,
    "sources": sources,
    "source_form": source_form,
    "source_edit": source_edit,
    "plans": plans,
    "plan_diff": plan_diff,
    "testrun": runs,
    "cutover": cutover,
    "calculator": calculator,
    "events": events,
    "audit": audit,
}


async def first(pilot: Pilot[Any]) -> None:
    """As an operator does: wait for the dashboard before pressing anything."""
    await until(
        pilot,
        lambda: pilot.app.screen.query_one(MachineTable).row_count == 4,
        "the dashboard first",
    )


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen(screen: str, size: str, shared_scene: Env, snap_compare: Any) -> None:
    async def run_before(pilot: Pilot[Any]) -> None:
        await first(pilot)
        await SCREENS[screen](pilot)
        await settle(pilot)

    assert snap_compare(make_app(shared_scene), terminal_size=SIZES[size], run_before=run_before)
