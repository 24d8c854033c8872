"""Sources: add, edit, test, remove; discovery with a filterable machine list, and protect
from there."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Input, Static

from tui import format as fmt
from tui.messages import ActionDone, JobProgressed, JobSubmitted
from tui.screens.base import FerrymanScreen
from tui.screens.dialogs import ConfirmDialog
from tui.screens.protect import ProtectDialog
from tui.screens.source_form import SourceForm

DISCOVERY_POLL_S = 0.5


def machine_matches(m: dict[str, Any], text: str) -> bool:
    t = text.strip().lower()
    if not t:
        return True
    hay = (
        f"{m['name']} {m.get('guest_os', '')} {m.get('power_state', '')} "
        f"{'protected' if m.get('protected') else 'unprotected'}".lower()
    )
    return all(word in hay for word in t.split())


class SourcesScreen(FerrymanScreen):
    NAV = "sources"
    BINDINGS = [
        Binding("a", "add", "Add"),
        Binding("e", "edit", "Edit"),
        Binding("t", "test", "Test"),
        Binding("delete", "remove", "Remove"),
        Binding("d", "discover", "Discover"),
        Binding("slash", "filter", "Filter"),
        Binding("p", "protect", "Protect"),
    ]

    @dataclass
    class Loaded(Message):
        sources: list[dict[str, Any]]
        machines: list[dict[str, Any]]

    def __init__(self) -> None:
        super().__init__()
        self.sources: list[dict[str, Any]] = []
        self.machines: list[dict[str, Any]] = []

    def compose_body(self) -> ComposeResult:
        yield Static("SOURCES", classes="pane-title")
        yield DataTable(id="sources", cursor_type="row")
        yield Static("MACHINES", classes="pane-title", id="machines-title")
        yield Input(
            placeholder="/ filter: name, OS, power state, 'unprotected'…", id="filter", compact=True
        )
        yield DataTable(id="src-machines", cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#sources", DataTable).add_columns(
            "NAME", "KIND", "ADDRESS", "MACHINES", "PROT", "TLS"
        )
        self.query_one("#src-machines", DataTable).add_columns(
            "MACHINE", "POWER", "GUEST OS", "CPU", "MEMORY", "DISKS", "PROTECTED"
        )
        self.query_one("#sources").focus()
        super().on_mount()

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="load", name="Loading the sources"
    )
    def load(self) -> None:
        c = self.services.client
        self.post_message(self.Loaded(c.sources(), c.machines()))

    def on_sources_screen_loaded(self, msg: Loaded) -> None:
        changed = (msg.sources, msg.machines) != (self.sources, self.machines)
        self.sources, self.machines = msg.sources, msg.machines
        if not changed:
            return
        t = self.query_one("#sources", DataTable)
        cur = t.cursor_row
        t.clear()
        for s in self.sources:
            tls = (
                "insecure!"
                if s.get("insecure")
                else (
                    "pinned"
                    if s.get("tls_thumbprint")
                    else ("CA" if s["kind"] == "vsphere" else "-")
                )
            )
            t.add_row(
                s["name"],
                s["kind"],
                s["uri"],
                str(s["machines"]),
                str(s["protected"]),
                tls,
                key=s["name"],
            )
        if self.sources:
            t.move_cursor(row=min(cur, len(self.sources) - 1))
        self.render_machines()

    def selected_source(self) -> dict[str, Any] | None:
        t = self.query_one("#sources", DataTable)
        if not t.row_count:
            return None
        key = t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value
        return next((s for s in self.sources if s["name"] == key), None)

    @on(DataTable.RowHighlighted, "#sources")
    def _source_moved(self) -> None:
        self.render_machines()

    @on(Input.Changed, "#filter")
    def _filtered(self) -> None:
        self.render_machines()

    def render_machines(self) -> None:
        src = self.selected_source()
        t = self.query_one("#src-machines", DataTable)
        text = self.query_one("#filter", Input).value
        cur = t.cursor_row
        t.clear()
        if src is None:
            self.query_one("#machines-title", Static).update(
                "MACHINES: no source yet; press a to add one"
            )
            return
        mine = [m for m in self.machines if m["source"] == src["name"]]
        shown = [m for m in mine if machine_matches(m, text)]
        self.query_one("#machines-title", Static).update(
            f"MACHINES ON {src['name']}: {len(shown)} of {len(mine)}"
            + ("" if mine else "  (press d to discover)")
        )
        for m in shown:
            t.add_row(
                m["name"],
                m["power_state"],
                (m.get("guest_os") or "-")[:24],
                str(m.get("cpus") or "-"),
                fmt.size((m.get("memory_mib") or 0) * 1024**2),
                f"{m.get('disks', 0)} / {fmt.size(m.get('size'))}",
                "✓ yes" if m["protected"] else "- no",
                key=m["name"],
            )
        if shown:
            t.move_cursor(row=min(cur, len(shown) - 1))

    # -- actions ------------------------------------------------------------------------------

    def action_filter(self) -> None:
        self.query_one("#filter", Input).focus()

    def action_add(self) -> None:
        self.app.push_screen(SourceForm(), lambda name: self.load() if name else None)

    def action_edit(self) -> None:
        src = self.selected_source()
        if src:
            self.app.push_screen(SourceForm(src), lambda name: self.load() if name else None)

    def action_test(self) -> None:
        src = self.selected_source()
        if src:
            self.notify(f"testing {src['name']}…", title="Test")
            self.test_source(src["name"])

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="action", name="Testing the source"
    )
    def test_source(self, name: str) -> None:
        self.services.client.test_source(name)
        self.post_message(ActionDone(f"✓ source {name} answers", "login and listing work"))

    def action_remove(self) -> None:
        src = self.selected_source()
        if not src:
            return
        body = (
            f"Remove {src['name']} ({src['uri']})? Its {src['machines']} discovered "
            "machines are forgotten. Refused while any of them is protected."
        )
        self.app.push_screen(
            ConfirmDialog("Remove source", body, "Remove"),
            lambda yes: self.remove_source(src["name"]) if yes else None,
        )

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="action", name="Removing the source"
    )
    def remove_source(self, name: str) -> None:
        self.services.client.remove_source(name)
        self.post_message(ActionDone(f"source {name} removed"))
        self.app.call_from_thread(self.load)

    def action_discover(self) -> None:
        src = self.selected_source()
        if src:
            self.discover(src["name"])

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="discover",
        name="Discovering machines",
    )
    def discover(self, name: str) -> None:
        c = self.services.client
        job = c.discover(name)
        self.post_message(JobSubmitted(f"discovery on {name} started", job))
        while job["state"] in ("queued", "running"):
            time.sleep(DISCOVERY_POLL_S)
            job = c.job(job["id"])
            self.post_message(JobProgressed(job))
        self.app.call_from_thread(self.load)

    def on_job_progressed(self, msg: JobProgressed) -> None:
        j = msg.job
        if j["state"] == "succeeded":
            r = j.get("result") or {}
            self.notify(
                f"{r.get('machines', '?')} machines ({r.get('added', 0)} new, "
                f"{r.get('missing', 0)} missing)",
                title="Discovery done",
            )
        elif j["state"] in ("failed", "interrupted", "cancelled"):
            self.notify(
                f"{j.get('error') or j['state']}\n→ check the source with t (test)",
                title="Discovery failed",
                severity="error",
                markup=False,
            )

    def selected_machine(self) -> dict[str, Any] | None:
        t = self.query_one("#src-machines", DataTable)
        if not t.row_count:
            return None
        key = t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value
        return next((m for m in self.machines if m["name"] == key), None)

    def action_protect(self) -> None:
        m = self.selected_machine()
        if m is None:
            self.notify("select a machine in the lower list first (tab)", title="Protect")
            return
        self.app.push_screen(
            ProtectDialog(m["name"], m), lambda done: self.load() if done else None
        )
