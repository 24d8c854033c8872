"""Events (what the engine did) and the audit log (who did what from where), filterable."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.message import Message
from textual.widgets import DataTable, Input, Select, TabbedContent, TabPane

from tui import format as fmt
from tui.screens.base import FerrymanScreen

LIMIT = 500


def words_match(hay: str, text: str) -> bool:
    """Every word must occur; a word starting with '-' must not ('-login' hides sessions)."""
    hay = hay.lower()
    for w in text.lower().split():
        if w.startswith("-") and len(w) > 1:
            if w[1:] in hay:
                return False
        elif w not in hay:
            return False
    return True


def event_matches(e: dict[str, Any], text: str, level: str) -> bool:
    if level != "all" and e["level"] != level:
        return False
    return words_match(f"{e['kind']} {e['message']} {e.get('machine') or ''}", text)


def audit_matches(a: dict[str, Any], text: str) -> bool:
    return words_match(f"{a['who']} {a['origin']} {a['action']} {a['params']} {a['result']}", text)


def params_text(p: Any) -> str:
    if isinstance(p, str):
        try:
            p = json.loads(p)
        except ValueError:
            return p
    if isinstance(p, dict):
        return " ".join(f"{k}={v}" for k, v in p.items() if v not in (None, "", False))
    return str(p)


class EventsScreen(FerrymanScreen):
    NAV = "events"
    BINDINGS = [
        Binding("slash", "filter", "Filter"),
        Binding("l", "level", "Level"),
        Binding("a", "toggle_tab", "Events/Audit"),
    ]

    @dataclass
    class Loaded(Message):
        events: list[dict[str, Any]]
        audit: list[dict[str, Any]]
        machines: dict[int, str]

    def __init__(self) -> None:
        super().__init__()
        self.events: list[dict[str, Any]] = []
        self.audit: list[dict[str, Any]] = []
        self._shown: tuple[Any, ...] = ()

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="ev-filters"):
            yield Input(
                placeholder="/ filter words; -word hides (e.g. -login)",
                id="ev-filter",
                compact=True,
            )
            yield Select(
                [
                    ("all levels", "all"),
                    ("info", "info"),
                    ("warning", "warning"),
                    ("error", "error"),
                ],
                value="all",
                allow_blank=False,
                id="ev-level",
                compact=True,
            )
        with TabbedContent(id="ev-tabs"):
            with TabPane("Events", id="tab-events"):
                yield DataTable(id="ev-table", cursor_type="row")
            with TabPane("Audit: who, what, where", id="tab-audit"):
                yield DataTable(id="au-table", cursor_type="row")

    def on_mount(self) -> None:
        ev = self.query_one("#ev-table", DataTable)
        ev.add_column("TIME", width=14)
        ev.add_column("LEVEL", width=7)
        ev.add_column("KIND", width=7)
        ev.add_column("MACHINE", width=10)
        ev.add_column("MESSAGE")
        au = self.query_one("#au-table", DataTable)
        au.add_column("TIME", width=14)
        au.add_column("WHO", width=8)
        au.add_column("FROM", width=16)
        au.add_column("ACTION", width=16)
        au.add_column("WHAT")
        au.add_column("RESULT")
        self.query_one("#ev-table").focus()
        super().on_mount()

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="load",
        name="Loading events and audit",
    )
    def load(self) -> None:
        c = self.services.client
        machines = {m["id"]: m["name"] for m in c.machines()}
        self.post_message(self.Loaded(c.events(limit=LIMIT), c.audit(limit=LIMIT), machines))

    def on_events_screen_loaded(self, msg: Loaded) -> None:
        for e in msg.events:
            e["machine"] = msg.machines.get(e.get("machine_id") or 0, "")
        self.events, self.audit = msg.events, msg.audit
        self.render_tables()

    @on(Input.Changed, "#ev-filter")
    @on(Select.Changed, "#ev-level")
    def render_tables(self) -> None:
        text = self.query_one("#ev-filter", Input).value
        level = str(self.query_one("#ev-level", Select).value)
        key = (
            text,
            level,
            len(self.events),
            self.events[-1:] and self.events[-1]["id"],
            len(self.audit),
            self.audit[-1:] and self.audit[-1]["id"],
        )
        if key == self._shown:
            return
        self._shown = key
        now = self.services.now()
        ev = self.query_one("#ev-table", DataTable)
        ev.clear()
        for e in reversed(self.events):
            if event_matches(e, text, level):
                ev.add_row(
                    fmt.clock(e["ts"], now),
                    fmt.level(e["level"]),
                    e["kind"],
                    e["machine"] or "-",
                    e["message"],
                )
        au = self.query_one("#au-table", DataTable)
        au.clear()
        for a in reversed(self.audit):
            if audit_matches(a, text):
                result = a["result"]
                mark = "✗ " if result.startswith("refused") else "✓ "
                au.add_row(
                    fmt.clock(a["ts"], now),
                    a["who"],
                    a["origin"],
                    a["action"],
                    params_text(a["params"]),
                    mark + result,
                )

    def action_filter(self) -> None:
        self.query_one("#ev-filter", Input).focus()

    def action_level(self) -> None:
        sel = self.query_one("#ev-level", Select)
        order = ["all", "info", "warning", "error"]
        sel.value = order[(order.index(str(sel.value)) + 1) % len(order)]

    def action_toggle_tab(self) -> None:
        tabs = self.query_one("#ev-tabs", TabbedContent)
        tabs.active = "tab-audit" if tabs.active == "tab-events" else "tab-events"
        self.query_one("#au-table" if tabs.active == "tab-audit" else "#ev-table").focus()
