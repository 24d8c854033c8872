"""The Ferryman TUI (grows with issue 7). Talks to ferrymand only through appliance.client,
always from thread workers, so the screen never freezes on a slow call."""

from __future__ import annotations

from typing import Any

from textual import work
from textual.app import App, ComposeResult
from textual.widgets import DataTable, Footer, Header, Static

from appliance.client import Client
from appliance.errors import FerrymanError

REFRESH_S = 1.0


class FerrymanApp(App[None]):
    TITLE = "Ferryman"
    BINDINGS = [("q", "quit", "Quit"), ("r", "refresh", "Refresh")]

    def __init__(self, client: Client | None = None) -> None:
        super().__init__()
        self.client = client or Client()

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("connecting to ferrymand...", id="status")
        yield DataTable(id="jobs", cursor_type="row")
        yield Footer()

    def on_mount(self) -> None:
        jobs = self.query_one("#jobs", DataTable)
        jobs.add_columns("ID", "KIND", "STATE", "PROGRESS")
        self.action_refresh()
        self.set_interval(REFRESH_S, self.action_refresh)

    def action_refresh(self) -> None:
        self.load()

    @work(thread=True, exclusive=True, exit_on_error=False)
    def load(self) -> None:
        try:
            health = self.client.health()
            jobs = self.client.jobs(limit=20)
        except FerrymanError as e:
            self.call_from_thread(self.show_error, e)
            return
        self.call_from_thread(self.show, health, jobs)

    def show_error(self, e: FerrymanError) -> None:
        self.query_one("#status", Static).update(f"[b]ferrymand unreachable[/b]: {e}")

    def show(self, health: dict[str, Any], jobs: list[dict[str, Any]]) -> None:
        probe = (health.get("probe") or {}).get("accel", "probing...")
        self.query_one("#status", Static).update(
            f"ferrymand {health['version']} | store {health['store']} | accelerator {probe}"
        )
        table = self.query_one("#jobs", DataTable)
        table.clear()
        for j in jobs:
            p = j.get("progress") or {}
            table.add_row(str(j["id"]), j["kind"], j["state"], p.get("phase", ""))


def run() -> int:
    FerrymanApp().run()
    return 0
