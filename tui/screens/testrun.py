"""Test runs: a live timeline per machine (convert, wait, boot, ready), the measured RTO and
the report, from ferrymand's plan API; r starts a run of the selected plan."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, Static

from tui import format as fmt
from tui.messages import JobSubmitted
from tui.screens.base import FerrymanScreen
from tui.widgets.plans.timeline import run_rto, timeline_rows

BAR_MIN, BAR_MAX = 12, 90
NAME_MIN = 10  # the machine column never gets narrower than this


class TestRunScreen(FerrymanScreen):
    NAV = "testrun"
    BINDINGS = [Binding("r", "start", "Start test run"), Binding("j", "json", "Report JSON")]

    @dataclass
    class Loaded(Message):
        runs: list[dict[str, Any]]
        plans: list[dict[str, Any]]

    def __init__(self) -> None:
        super().__init__()
        self.runs: list[dict[str, Any]] = []
        self.plans: list[dict[str, Any]] = []
        self.selected: int | None = None
        self.show_json = False

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="tr-main"):
            with Vertical(id="tr-list-pane"):
                yield Static("TEST RUNS", classes="pane-title")
                yield DataTable(id="tr-runs", cursor_type="row")
            with Vertical(id="tr-detail"):
                yield Static("", id="tr-head")
                yield DataTable(id="tr-timeline", cursor_type="row")
                with VerticalScroll(id="tr-report-pane"):
                    yield Static("", id="tr-report")

    def on_mount(self) -> None:
        self.query_one("#tr-runs", DataTable).add_columns("RUN", "PLAN", "STATE", "RTO")
        self.query_one("#tr-runs").focus()
        super().on_mount()

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="load", name="Loading the test runs"
    )
    def load(self) -> None:
        s = self.services
        self.post_message(self.Loaded(s.plan_runs("test"), s.plans()))

    def on_test_run_screen_loaded(self, msg: Loaded) -> None:
        if msg.runs == self.runs and msg.plans == self.plans and not self.has_running_run():
            return
        self.runs, self.plans = msg.runs, msg.plans
        t = self.query_one("#tr-runs", DataTable)
        cur = t.cursor_row
        t.clear()
        for r in self.runs:
            state = fmt.job_state(r["state"]) if r["state"] in fmt.JOB_STATES else r["state"]
            t.add_row(
                str(r["id"]),
                f"{r['plan']} v{r['version']}",
                state,
                fmt.duration(run_rto(r)),
                key=str(r["id"]),
            )
        if self.runs:
            t.move_cursor(row=min(cur, len(self.runs) - 1))
            if self.selected is None:
                self.selected = self.runs[0]["id"]
        self.render_run()

    def has_running_run(self) -> bool:
        return any(r["state"] == "running" for r in self.runs)

    @on(DataTable.RowHighlighted, "#tr-runs")
    def _run_moved(self, event: DataTable.RowHighlighted) -> None:
        if event.row_key.value:
            self.selected = int(event.row_key.value)
            self.render_run()

    def render_run(self) -> None:
        run = next((r for r in self.runs if r["id"] == self.selected), None)
        head = self.query_one("#tr-head", Static)
        tl = self.query_one("#tr-timeline", DataTable)
        rep_w = self.query_one("#tr-report", Static)
        if run is None:
            plans = ", ".join(p["name"] for p in self.plans) or "none yet (3: Plans)"
            head.update(
                f"No test run yet. Plans: {plans}. Press r to start one for the first "
                "plan; replication keeps running meanwhile."
            )
            tl.clear(columns=True)
            rep_w.update("")
            return
        now = self.services.now()
        rep = run["report"] or {}
        name_w, width = self.column_widths(run)
        h = Text()
        h.append(f"run {run['id']}  plan {run['plan']} v{run['version']}  ", style="bold")
        h.append(f"{run['state']}  started {fmt.clock(run['started_at'], now)}  ")
        h.append(f"RTO {fmt.duration(run_rto(run))}", style="bold")
        h.append("\nC convert · wait B boot R ready-checks", style="dim")
        head.update(h)
        tl.clear(columns=True)
        tl.add_column("MACHINE", width=name_w)
        tl.add_column("RANK")
        tl.add_column("RTO")
        tl.add_column("STATE")
        tl.add_column("TIMELINE", width=width)
        for name, *rest in timeline_rows(run, width):
            tl.add_row(name if len(name) <= name_w else name[: name_w - 1] + "…", *rest)
        if self.show_json:
            rep_w.update(json.dumps(rep, indent=2))
        else:
            text = Text()
            totals = rep.get("totals") or {}
            if totals:
                text.append(
                    f"{totals.get('ready', 0)} of {totals.get('machines', 0)} ready; "
                    f"slowest conversion {fmt.duration(totals.get('slowest_convert_s'))}"
                    f"; ideal {fmt.duration(totals.get('ideal_s'))}, overhead ratio "
                    f"{totals.get('overhead_ratio') or '-'}\n"
                )
            ms = rep.get("machines") or {}
            for m in ms.values() if isinstance(ms, dict) else ms:
                if m.get("error"):
                    text.append(f"✗ {m.get('machine')}: {m['error']}\n", style="bold")
            rep_w.update(text or "(j shows the full report as JSON)")

    def column_widths(self, run: dict[str, Any]) -> tuple[int, int]:
        """(machine name, timeline) widths that fit the detail pane: the other columns take
        what their longest value needs; at 80 columns the name gives way first (clipped with
        an ellipsis) so the whole timeline stays visible."""
        probe = timeline_rows(run, 1)

        def need(i: int, head: str) -> int:
            return max([len(head)] + [len(r[i]) for r in probe])

        # DataTable pads every cell by one column each side; one more for the scrollbar
        room = self.query_one("#tr-detail").size.width - 1
        room -= sum(need(i, h) + 2 for i, h in ((1, "RANK"), (2, "RTO"), (3, "STATE"))) + 2
        name = need(0, "MACHINE")
        if room - (name + 2) < BAR_MIN:
            name = max(NAME_MIN, room - 2 - BAR_MIN)
        return name, max(BAR_MIN, min(BAR_MAX, room - (name + 2)))

    def action_json(self) -> None:
        self.show_json = not self.show_json
        self.render_run()

    def action_start(self) -> None:
        run = next((r for r in self.runs if r["id"] == self.selected), None)
        plan = run["plan"] if run else (self.plans[0]["name"] if self.plans else None)
        if plan is None:
            self.notify(
                "write a plan first (3: Plans)", title="No plan to test", severity="warning"
            )
            return
        self.start(plan)

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="action",
        name="Starting the test run",
    )
    def start(self, plan: str) -> None:
        job = self.services.start_test_run(plan)
        self.post_message(JobSubmitted(f"test run of {plan} started", job))
