"""Cutover wizard: the steps with explicit confirmations, live state, a rollback action at
each step and the downtime clock (source stop to all ready).

The state machine lives in ferrymand (issue 6); this screen shows plan_runs of kind
'cutover' from the store and sends each confirmation through Services.cutover_step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.widgets import DataTable, Select, Static

from tui import format as fmt
from tui.messages import ActionDone
from tui.screens.base import FerrymanScreen
from tui.screens.dialogs import ConfirmDialog
from tui.widgets.plans.timeline import STEP_MARK, cutover_steps, downtime_s, next_step


def clock_hms(seconds: float | None) -> str:
    if seconds is None:
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600:02d}:{(s % 3600) // 60:02d}:{s % 60:02d}"


class CutoverScreen(FerrymanScreen):
    NAV = "cutover"
    BINDINGS = [
        Binding("n", "confirm", "Next step (confirm)"),
        Binding("b", "rollback", "Roll back"),
    ]

    @dataclass
    class Loaded(Message):
        plans: list[dict[str, Any]]
        runs: list[dict[str, Any]]

    def __init__(self) -> None:
        super().__init__()
        self.plans: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.plan: str | None = None

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="co-top"):
            yield Select([], prompt="plan", id="co-plan", allow_blank=True, compact=True)
            yield Static("", id="co-clock")
        with Vertical(id="co-body"):
            yield DataTable(id="co-steps", cursor_type="row")
            yield Static("", id="co-help")

    def on_mount(self) -> None:
        t = self.query_one("#co-steps", DataTable)
        t.add_column("", width=2)
        t.add_column("STEP", width=12)
        t.add_column("STATE", width=11)
        t.add_column("TOOK", width=6)
        t.add_column("WHAT")
        t.focus()
        super().on_mount()

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="load", name="Loading the cutover"
    )
    def load(self) -> None:
        s = self.services
        self.post_message(self.Loaded(s.plans(), s.plan_runs("cutover")))

    def on_cutover_screen_loaded(self, msg: Loaded) -> None:
        if [p["name"] for p in msg.plans] != [p["name"] for p in self.plans]:
            sel = self.query_one("#co-plan", Select)
            sel.set_options([(p["name"], p["name"]) for p in msg.plans])
            if self.plan is None and msg.plans:
                running = next((r["plan"] for r in msg.runs if r["state"] == "running"), None)
                self.plan = running or msg.plans[0]["name"]
                sel.value = self.plan
        self.plans, self.runs = msg.plans, msg.runs
        self.render_steps()

    @on(Select.Changed, "#co-plan")
    def _plan_changed(self, event: Select.Changed) -> None:
        if event.value is not Select.BLANK:
            self.plan = str(event.value)
            self.render_steps()

    def current_run(self) -> dict[str, Any] | None:
        return next((r for r in self.runs if r["plan"] == self.plan), None)

    def render_steps(self) -> None:
        run = self.current_run()
        now = self.services.now()
        t = self.query_one("#co-steps", DataTable)
        cur = t.cursor_row
        t.clear()
        steps = ((run or {}).get("report") or {}).get("steps", {})
        for step, label, state, typed in cutover_steps(run):
            info = steps.get(step) or {}
            took = None
            if info.get("start"):
                end = fmt.parse_ts(info.get("end")) or now
                took = (end - fmt.parse_ts(info["start"])).total_seconds()  # type: ignore[operator]
            t.add_row(
                STEP_MARK.get(state, "?"),
                step,
                state.upper() if state in ("failed",) else state,
                fmt.duration(took),
                label + (" (type the plan name)" if typed else ""),
                key=step,
            )
        t.move_cursor(row=cur)
        secs, running = downtime_s(run, now)
        clock = Text()
        clock.append(" DOWNTIME ", style="bold reverse")
        clock.append(f" {clock_hms(secs)} ", style="bold")
        clock.append("running" if running else ("ended" if secs is not None else "not started"))
        self.query_one("#co-clock", Static).update(clock)
        nxt = next_step(run)
        help_ = Text()
        if self.plan is None:
            help_.append("No plan yet: write one in 3 (Plans), test it in 4, then come back.")
        elif run is None:
            help_.append(
                f"No cutover of {self.plan} yet. Enter starts with the preflight; "
                "nothing is stopped before you confirm 'stop-source'."
            )
        elif nxt:
            help_.append(
                f"Next: {nxt}. Enter confirms it; b rolls back the highlighted step "
                "(sources started again, target discarded)."
            )
        elif run["state"] == "running":
            help_.append("A step is running in ferrymand; closing this screen does not stop it.")
        else:
            help_.append(f"Cutover {run['state']}.")
        self.query_one("#co-help", Static).update(help_)

    # -- actions ------------------------------------------------------------------------------

    def action_confirm(self) -> None:
        if self.plan is None:
            self.notify("choose a plan first", title="Nothing to confirm")
            return
        run = self.current_run()
        step = next_step(run) if run else "preflight"
        if step is None:
            self.notify("no step waits for a confirmation", title="Nothing to confirm")
            return
        label, typed = next((lbl, ty) for s, lbl, _, ty in cutover_steps(run) if s == step)
        plan = self.plan
        self.app.push_screen(
            ConfirmDialog(
                f"Cutover {plan}: {step}",
                label,
                f"Run {step}",
                type_to_confirm=plan if typed else "",
            ),
            lambda yes: self.send_step(plan, step) if yes else None,
        )

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="action",
        name="Confirming the cutover step",
    )
    def send_step(self, plan: str, step: str) -> None:
        self.services.cutover_step(plan, step, confirm=plan)
        self.post_message(ActionDone(f"cutover {plan}: {step} confirmed"))
        self.app.call_from_thread(self.load)

    def action_rollback(self) -> None:
        run = self.current_run()
        t = self.query_one("#co-steps", DataTable)
        if run is None or self.plan is None:
            self.notify("no cutover is in progress", title="Nothing to roll back")
            return
        step = str(t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value)
        plan = self.plan
        self.app.push_screen(
            ConfirmDialog(
                f"Roll back {plan} from {step}",
                "The sources are started again and the target machines discarded. "
                "Restore points stay.",
                "Roll back",
                type_to_confirm=plan,
            ),
            lambda yes: self.send_rollback(plan, step) if yes else None,
        )

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="action",
        name="Rolling the cutover back",
    )
    def send_rollback(self, plan: str, step: str) -> None:
        self.services.cutover_rollback(plan, step)
        self.post_message(ActionDone(f"cutover {plan}: rollback from {step} started"))
        self.app.call_from_thread(self.load)
