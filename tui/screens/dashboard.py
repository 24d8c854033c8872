"""Dashboard: every protected machine at a glance, active jobs, recent events.

Refreshed once a second by a thread worker that asks ferrymand (machines, jobs, events) and
reads the sync history from the store; the result arrives as one Loaded message.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.events import Resize
from textual.message import Message
from textual.widgets import DataTable, Static

from appliance.inventory import rpo_status
from tui import format as fmt
from tui.messages import JobSubmitted, OpenMachine
from tui.screens.base import FerrymanScreen
from tui.widgets.dashboard.machine_table import WIDE, MachineTable, alerts, row_cells

TREND_SAMPLES = 30  # live rate samples kept per machine (one per refresh)
# The whole machine list (500 machines: ~400 KB of JSON, decoded holding the GIL) every 10th
# tick and whenever a job starts or ends; active jobs and events every tick.
FULL_EVERY = 10
AGE_REFRESH_S = 10  # ages past a minute are shown in minutes: 10 s granularity is enough
EVENTS_SHOWN = 30
FIRST_PAINT_ROWS = 60  # more than a 160x48 screen shows: the rest is added after the paint


def _key(m: dict[str, Any], progress: bool = True) -> tuple[Any, ...]:
    """What the row shows of a machine; the daemon's own age_s/rpo_status (real clock,
    different on every call) are left out: the screen computes them with its clock. The
    summary line does not show progress, so its key leaves that out too."""
    rp = m.get("newest_rp") or {}
    job = m.get("active_job")
    if job and not progress:
        job = (job.get("id"), job.get("state"))
    return (
        m.get("protected"),
        m.get("rpo_seconds"),
        m.get("power_state"),
        m.get("cutover_done"),
        m.get("failed_syncs"),
        rp.get("source_time"),
        job,
        m.get("guest_os"),
        m.get("source"),
    )


class DashboardScreen(FerrymanScreen):
    NAV = "dashboard"
    BINDINGS = [
        Binding("o", "open", "Open"),
        Binding("s", "sync", "Sync now"),
        Binding("c", "cancel_job", "Cancel job"),
        Binding("r", "refresh", "Refresh"),
        Binding("tab", "app.focus_next", "Next pane", show=False),
    ]

    @dataclass
    class Loaded(Message):
        health: dict[str, Any] | None  # None: a light tick (jobs and events only)
        machines: list[dict[str, Any]] | None
        jobs: list[dict[str, Any]]
        events: list[dict[str, Any]]
        history: dict[int, list[float]] | None

    def __init__(self) -> None:
        super().__init__()
        self.trends: dict[str, deque[float]] = {}
        self.machines: list[dict[str, Any]] = []
        self._history_seeded: set[str] = set()
        self._cells: dict[str, tuple[Any, tuple[str, ...]]] = {}
        self.all: list[dict[str, Any]] = []  # every machine, as of the last full load
        self.health: dict[str, Any] = {}
        self._ticks = 0
        self._need_full = True
        self._summary_key: Any = None
        self._lists: tuple[Any, Any] = (None, None)
        self._summary_terms: list[Any] = []
        self._rendered_bucket: Any = None
        self._summary_text: Text | None = None
        self._summary_height = -1

    def compose_body(self) -> ComposeResult:
        yield Static("connecting to ferrymand…", id="summary")
        yield MachineTable(id="machines")
        with Horizontal(id="lower"):
            with Vertical(id="jobs-pane"):
                yield Static("ACTIVE JOBS", classes="pane-title")
                yield DataTable(id="jobs", cursor_type="row")
            with Vertical(id="events-pane"):
                yield Static("RECENT EVENTS", classes="pane-title")
                yield DataTable(id="events", cursor_type="row", show_header=False)

    def on_mount(self) -> None:
        # Fixed widths: auto widths depend on when rows arrive relative to the first layout.
        jobs = self.query_one("#jobs", DataTable)
        for label, width in (("ID", 4), ("KIND", 6), ("MACHINE", 9), ("STATE", 11)):
            jobs.add_column(label, key=label.lower(), width=width)
        ev = self.query_one("#events", DataTable)
        ev.add_column("TIME", width=11)
        ev.add_column("LEVEL", width=7)
        ev.add_column("MESSAGE", width=120)
        self.query_one(MachineTable).set_layout(self.size.width >= WIDE)
        self.query_one(MachineTable).focus()
        super().on_mount()

    def on_resize(self, event: Resize) -> None:
        self._summary_height = -1  # wrapped anew at the new width: lay out at the next update
        if self.query_one(MachineTable).set_layout(event.size.width >= WIDE):
            self.render_machines()

    # -- data ---------------------------------------------------------------------------------

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="load",
        name="Refreshing the dashboard",
    )
    def load(self) -> None:
        s = self.services
        c = s.client
        full = self._need_full or self._ticks % FULL_EVERY == 0
        self._ticks += 1
        self._need_full = False
        if not full:
            jobs, events = c.jobs(active=True, limit=50), c.events(limit=EVENTS_SHOWN)
            self.post_message(self.Loaded(None, None, jobs, events, None))
            return
        # A full load asks five things at once: the daemon answers them in parallel, so the
        # first picture waits for the slowest (the 500 machines), not for the sum.
        with ThreadPoolExecutor(max_workers=5, thread_name_prefix="dashboard") as pool:
            fj = pool.submit(c.jobs, active=True, limit=50)
            fe = pool.submit(c.events, limit=EVENTS_SHOWN)
            fh, fm = pool.submit(c.health), pool.submit(c.machines)
            fs = pool.submit(s.throughput_history)
            self.post_message(
                self.Loaded(fh.result(), fm.result(), fj.result(), fe.result(), fs.result())
            )

    def merge_jobs(self, jobs: list[dict[str, Any]]) -> set[str]:
        """Between full loads: the live progress of active jobs into the last machine list.
        A job that started or ended changes more than progress: ask for a full load.
        Returns the names of the machines whose row may have changed."""
        active = {
            j["machine_id"]: {k: j.get(k) for k in ("id", "kind", "state", "progress")}
            for j in jobs
            if j.get("machine_id")
        }
        before = {m["id"]: m["active_job"]["id"] for m in self.all if m.get("active_job")}
        if before != {mid: j["id"] for mid, j in active.items()}:
            self._need_full = True
        touched: set[str] = set()
        merged = []
        for m in self.all:
            if m.get("active_job") or m["id"] in active:
                m = {**m, "active_job": active.get(m["id"])}
                touched.add(m["name"])
            merged.append(m)
        self.all = merged
        return touched

    def on_dashboard_screen_loaded(self, msg: Loaded) -> None:
        # A light tick (jobs and events only) touches the few machines with a job; the 500
        # others keep their rows, keys and summary terms from the last full load.
        touched: set[str] | None = None
        if msg.machines is None:
            touched = self.merge_jobs(msg.jobs)
        else:
            self.all, self.health = msg.machines, msg.health or {}
            self._summary_terms = [_key(m, progress=False) for m in self.all]
            self.app.machine_names = [m["name"] for m in self.all]  # type: ignore[attr-defined]
        shown = [m for m in self.all if m["protected"] or m.get("active_job")]
        by_id = {m["id"]: m["name"] for m in shown} if msg.history else {}
        for mid, values in (msg.history or {}).items():
            name = by_id.get(mid)
            if name and name not in self._history_seeded:
                self.trends.setdefault(name, deque(maxlen=TREND_SAMPLES)).extend(values)
                self._history_seeded.add(name)
        for m in shown:
            job = m.get("active_job")
            rate = ((job or {}).get("progress") or {}).get("rate")
            if job and job["state"] == "running" and rate:
                self.trends.setdefault(m["name"], deque(maxlen=TREND_SAMPLES)).append(rate)
        self.machines = shown
        self.render_machines(touched)
        summary_key = (
            self._age_bucket(),
            self._summary_terms,
            len(msg.jobs),
            [j["state"] for j in msg.jobs],
            (self.health.get("probe") or {}),
        )
        if summary_key != self._summary_key:  # 500 machines: skip what did not change
            self._summary_key = summary_key
            self.render_summary(self.health, self.all, msg.jobs)
        if msg.jobs != self._lists[0]:
            self.render_jobs(msg.jobs, {m["id"]: m["name"] for m in self.all})
        if msg.events != self._lists[1]:
            self.render_events(msg.events)
        self._lists = (msg.jobs, msg.events)

    def _age_bucket(self) -> int:
        """Ages are shown to the minute past 60 s: recompute the cells every 10 s at most."""
        return int(self.services.now().timestamp() // AGE_REFRESH_S)

    def render_machines(self, only: set[str] | None = None) -> None:
        """Row cells are recomputed only for machines whose data, trend or age bucket
        changed (``only``: the machines a light tick touched, when the bucket did not move):
        with 500 machines the loop stays free for the keyboard."""
        table = self.query_one(MachineTable)
        now = self.services.now()
        bucket = (self._age_bucket(), bool(table.wide))
        if bucket != self._rendered_bucket:
            only = None
        self._rendered_bucket = bucket
        machines = self.machines
        if not table.row_count and len(machines) > FIRST_PAINT_ROWS:
            # First paint with a screenful; the other rows follow right after it is drawn.
            machines = machines[:FIRST_PAINT_ROWS]
            self.call_after_refresh(self.render_machines)
        rows = []
        for m in machines:
            name = m["name"]
            cached = self._cells.get(name)
            if only is None or name in only or cached is None:
                trend = self.trends.get(name, ())
                key = (bucket, _key(m), len(trend), trend[-1] if trend else None)
                if cached is None or cached[0] != key:
                    cached = (key, row_cells(m, now, trend, bool(table.wide)))
                    self._cells[name] = cached
            rows.append((name, cached[1]))
        table.show(rows)

    def render_summary(
        self, health: dict[str, Any], machines: list[dict[str, Any]], jobs: list[dict[str, Any]]
    ) -> None:
        protected = [m for m in machines if m["protected"]]
        now = self.services.now()
        counts = {"within": 0, "near": 0, "over": 0}
        warn: list[str] = []
        for m in protected:
            newest = m.get("newest_rp") or {}
            age = fmt.age_s(newest.get("source_time"), now) if newest else None
            status = rpo_status(age, m.get("rpo_seconds"))
            counts[status] = counts.get(status, 0) + 1
            warn += [f"{m['name']}: {a}" for a in alerts(m, status)]
        accel = (health.get("probe") or {}).get("accel", "not probed")
        line = Text(no_wrap=True, overflow="ellipsis")
        line.append(f"{len(protected)} protected  ")
        line.append(f"✓{counts['within']} within  ")
        line.append(f"!{counts['near']} near  ", style="bold" if counts["near"] else "")
        line.append(f"✗{counts['over']} over RPO  ", style="bold" if counts["over"] else "")
        line.append(f"▶{sum(1 for j in jobs if j['state'] == 'running')} running  ")
        line.append(f"accel {accel}", style="dim")
        if not protected:
            line = Text(
                "No protected machines yet: press 2 (Sources), add a source, discover, "
                "then p to protect.",
                no_wrap=False,
            )
        if warn:
            line.append("\n")
            line.append("ALERT ", style="bold reverse")
            line.append(" " + "; ".join(warn[:4]) + (" …" if len(warn) > 4 else ""), style="bold")
        # Same words, same picture: no repaint. A new height (an ALERT line more or less)
        # needs a layout pass of the whole screen; otherwise the summary repaints alone.
        summary = self.query_one("#summary", Static)
        if line == self._summary_text:
            return
        height = len(line.wrap(self.app.console, max(summary.size.width, 1)))
        summary.update(line, layout=height != self._summary_height)
        self._summary_text, self._summary_height = line, height

    def render_jobs(self, jobs: list[dict[str, Any]], names: dict[int, str]) -> None:
        t = self.query_one("#jobs", DataTable)
        rows = []
        for j in jobs:
            p = j.get("progress") or {}
            state = fmt.job_state(j["state"])
            if j["state"] == "running" and p.get("total"):
                state = f"▶ {p['done'] / p['total']:.0%}"
            rows.append((str(j["id"]), j["kind"], names.get(j.get("machine_id") or 0, "-"), state))
        keys = [str(k.value) for k in t.rows]
        if keys == [r[0] for r in rows]:  # the same jobs: only their progress moved
            for r in rows:
                if str(t.get_cell(r[0], "state")) != r[3]:
                    t.update_cell(r[0], "state", r[3])
            return
        cursor = t.cursor_row
        t.clear()
        for r in rows:
            t.add_row(*r, key=r[0])
        if rows:
            t.move_cursor(row=min(cursor, len(rows) - 1))

    def render_events(self, events: list[dict[str, Any]]) -> None:
        t = self.query_one("#events", DataTable)
        t.clear()
        now = self.services.now()
        for e in reversed(events):
            t.add_row(fmt.clock(e["ts"], now), fmt.level(e["level"]), e["message"])

    # -- actions ------------------------------------------------------------------------------

    def action_refresh(self) -> None:
        self._need_full = True
        self.load()

    def action_open(self) -> None:
        name = self.query_one(MachineTable).selected_name()
        if name:
            self.post_message(OpenMachine(name))

    @on(MachineTable.Opened)
    def _opened(self, msg: MachineTable.Opened) -> None:
        self.post_message(OpenMachine(msg.name))

    def action_sync(self) -> None:
        name = self.query_one(MachineTable).selected_name()
        if name:
            self.start_sync(name)

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="action", name="Starting the sync"
    )
    def start_sync(self, name: str) -> None:
        job = self.services.client.sync(name)
        self.post_message(JobSubmitted(f"sync of {name} started", job))
        self._need_full = True
        self.app.call_from_thread(self.load)

    def action_cancel_job(self) -> None:
        t = self.query_one("#jobs", DataTable)
        if not t.row_count:
            self.notify("no active job to cancel", title="Nothing to cancel")
            return
        key = t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value
        if key:
            self.cancel_job(int(key))

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="action", name="Cancelling the job"
    )
    def cancel_job(self, job_id: int) -> None:
        job = self.services.client.cancel(job_id)
        self.post_message(JobSubmitted(f"cancel of job {job_id} requested", job))
