"""Cutover wizard: the steps with explicit confirmations, live state, the rollback action and
the downtime clock (source stop to all ready).

The state machine lives in ferrymand (appliance/plans/cutover.py); this screen shows the
plan's newest cutover run and sends each confirmation. Steps that cannot be undone by a
restart of the source (stop-source, commit) ask to type the plan name.
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

FINAL = ("committed", "rolled-back")
BUSY = ("running", "rolling-back")


def clock_hms(seconds: float | None) -> str:
    if seconds is None:
        return "--:--:--"
    s = int(seconds)
    return f"{s // 3600:02d}:{(s % 3600) // 60:02d}:{s % 60:02d}"


class CutoverScreen(FerrymanScreen):
    NAV = "cutover"
    BINDINGS = [
        Binding("n", "confirm", "Start / next step"),
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
        t.add_column("STATE", width=12)
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
                open_run = next((r["plan"] for r in msg.runs if r["state"] not in FINAL), None)
                self.plan = open_run or msg.plans[0]["name"]
                sel.value = self.plan
        self.plans, self.runs = msg.plans, msg.runs
        self.render_steps()

    @on(Select.Changed, "#co-plan")
    def _plan_changed(self, event: Select.Changed) -> None:
        if event.value is not Select.BLANK:
            self.plan = str(event.value)
            self.render_steps()

    def current_run(self) -> dict[str, Any] | None:
        """The plan's newest cutover (runs come newest first)."""
        return next((r for r in self.runs if r["plan"] == self.plan), None)

    def render_steps(self) -> None:
        run = self.current_run()
        t = self.query_one("#co-steps", DataTable)
        cur = t.cursor_row
        t.clear()
        for step, label, state, typed, secs in cutover_steps(run):
            # the steps that cannot be undone say so where the eye is when they wait
            confirm = "? TYPE NAME" if typed else "? CONFIRM"
            word = {"failed": "✗ FAILED", "awaiting": confirm}.get(state, state)
            t.add_row(STEP_MARK.get(state, "?"), step, word, fmt.duration(secs), label, key=step)
        t.move_cursor(row=cur)
        secs, running = downtime_s(run, self.services.now())
        clock = Text()
        clock.append(" DOWNTIME ", style="bold reverse")
        clock.append(f" {clock_hms(secs)} ", style="bold")
        clock.append("running" if running else ("ended" if secs is not None else "not started"))
        self.query_one("#co-clock", Static).update(clock)
        self.query_one("#co-help", Static).update(self.help_text(run))

    def help_text(self, run: dict[str, Any] | None) -> Text:
        t = Text()
        nxt = next_step(run)
        if self.plan is None:
            t.append("No plan yet: write one in 3 (Plans), test it in 4, then come back.")
        elif run is None or run["state"] in FINAL:
            if run is not None:
                t.append(f"Last cutover of {self.plan}: {run['state']}. ")
            t.append(
                f"n starts a cutover of {self.plan}: the preflight runs; nothing is "
                "stopped before you confirm stop-source."
            )
        elif run.get("waiting_for"):
            who = (run.get("approval") or {}).get("requested_by")
            t.append(
                f"Cutover {run['id']}: waiting for approval by a second operator "
                f"(requested by {who}). ",
                style="bold",
            )
            t.append("Another operator presses n here and types the plan name. b rolls back.")
        elif nxt:
            state = "failed; n repeats it" if run["state"] == "failed" else "waits for you: n"
            t.append(f"Cutover {run['id']}: {nxt} {state}. ", style="bold")
            t.append("b rolls back (sources started again, targets discarded, points kept).")
        elif run["state"] in BUSY:
            t.append(
                f"Cutover {run['id']}: {run['step']} is running in ferrymand; closing "
                "this screen does not stop it."
            )
        else:
            t.append(f"Cutover {run['id']}: {run['state']}.")
        return t

    # -- actions ------------------------------------------------------------------------------

    def action_confirm(self) -> None:
        plan = self.plan
        if plan is None:
            self.notify("choose a plan first", title="Nothing to confirm")
            return
        run = self.current_run()
        if run is None or run["state"] in FINAL:
            self.app.push_screen(
                ConfirmDialog(
                    f"Start the cutover of {plan}",
                    "Runs the preflight now. Each later step waits for you.",
                    "Start cutover",
                ),
                lambda yes: self.send_start(plan) if yes else None,
            )
            return
        if run.get("waiting_for"):
            who = (run.get("approval") or {}).get("requested_by")
            self.app.push_screen(
                ConfirmDialog(
                    f"Approve the cutover of {plan}",
                    f"{who} asked for it; a second operator (not {who}) approves it.",
                    "Approve",
                    type_to_confirm=plan,
                ),
                lambda yes: self.send_approval(int(run["id"]), plan) if yes else None,
            )
            return
        step = next_step(run)
        if step is None:
            self.notify(f"{run['step']} is still running", title="Nothing to confirm")
            return
        label, typed = next((lbl, ty) for s, lbl, _, ty, _ in cutover_steps(run) if s == step)
        self.app.push_screen(
            ConfirmDialog(
                f"Cutover {plan}: {step}",
                label,
                f"Run {step}",
                type_to_confirm=plan if typed else "",
            ),
            lambda yes: self.send_step(int(run["id"]), step) if yes else None,
        )

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="action",
        name="Starting the cutover",
    )
    def send_start(self, plan: str) -> None:
        run = self.services.cutover_start(plan)
        self.post_message(
            ActionDone(
                f"cutover {run['id']} of {plan} started", f"preflight done; next: {run.get('next')}"
            )
        )
        self.app.call_from_thread(self.load)

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="action",
        name="Approving the cutover",
    )
    def send_approval(self, run_id: int, plan: str) -> None:
        run = self.services.client.cutover_approve(run_id, plan)
        self.post_message(
            ActionDone(
                f"cutover {run_id} approved by {run['approval']['approved_by']}",
                f"next: {run.get('next')}",
            )
        )
        self.app.call_from_thread(self.load)

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="action",
        name="Confirming the cutover step",
    )
    def send_step(self, run_id: int, step: str) -> None:
        self.services.cutover_confirm(run_id, step)
        self.post_message(
            ActionDone(
                f"cutover {run_id}: {step} confirmed",
                "it runs in ferrymand; quitting does not stop it",
            )
        )
        self.app.call_from_thread(self.load)

    def action_rollback(self) -> None:
        run = self.current_run()
        plan = self.plan
        if run is None or plan is None or run["state"] in FINAL:
            self.notify("no open cutover to roll back", title="Nothing to roll back")
            return
        where = next_step(run) or run.get("step") or "?"
        self.app.push_screen(
            ConfirmDialog(
                f"Roll back cutover {run['id']} of {plan} (at {where})",
                "Every source this cutover stopped is started again and the target "
                "machines are discarded. Restore points stay.",
                "Roll back",
                type_to_confirm=plan,
            ),
            lambda yes: self.send_rollback(int(run["id"])) if yes else None,
        )

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="action",
        name="Rolling the cutover back",
    )
    def send_rollback(self, run_id: int) -> None:
        self.services.cutover_rollback(run_id)
        self.post_message(ActionDone(f"cutover {run_id}: rollback started"))
        self.app.call_from_thread(self.load)
