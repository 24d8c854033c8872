"""Plan editor: a form view (machines, ranks, networks, checks), a JSON view validated as you
type (line, path, fix), save with versions, and the diff against the previous version.

Plans come from ferrymand's plan API; saving sends the document, which the daemon validates
again against its inventory and stores as a new version only when it changed.
"""

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
from textual.widgets import Button, DataTable, Static, TabbedContent, TabPane, TextArea

from tui import plan_schema as ps
from tui.messages import ActionDone
from tui.screens.base import FerrymanScreen
from tui.widgets.common.fields import Field, check_all, integer, max_len


def doc_of(version: dict[str, Any]) -> Any:
    d = version["document"]
    return json.loads(d) if isinstance(d, str) else d


def check_summary(c: dict[str, Any]) -> str:
    t = c.get("type")
    if t == "tcp":
        return f"tcp {c.get('address', '?')}:{c.get('port', '?')}"
    if t == "console":
        return f"console /{c.get('pattern', '')}/"
    if t == "delay":
        return f"delay {c.get('seconds', '?')}s"
    return str(t)


class PlansScreen(FerrymanScreen):
    NAV = "plans"
    auto_refresh = False
    BINDINGS = [
        Binding("ctrl+s", "save", "Save version"),
        Binding("ctrl+n", "new", "New from protected"),
        Binding("ctrl+g", "goto_problem", "Go to problem"),
        Binding("f2", "tab('pl-form')", "Form"),
        Binding("f3", "tab('pl-json')", "JSON"),
        Binding("f4", "tab('pl-diff')", "Diff"),
    ]

    @dataclass
    class Loaded(Message):
        plans: list[dict[str, Any]]
        versions: dict[str, list[dict[str, Any]]]
        protected: list[dict[str, Any]]

    def __init__(self) -> None:
        super().__init__()
        self.plans: list[dict[str, Any]] = []
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.protected: list[dict[str, Any]] = []
        self.current: str | None = None
        self.problems: list[ps.Problem] = []

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="pl-main"):
            with Vertical(id="pl-list-pane"):
                yield Static("PLANS", classes="pane-title")
                yield DataTable(id="pl-list", cursor_type="row")
            with TabbedContent(id="pl-tabs", initial="pl-json"):
                with TabPane("Form F2", id="pl-form"), VerticalScroll():
                    yield Static("MACHINES (boot by rank)", classes="pane-title")
                    yield DataTable(id="pl-machines", cursor_type="row")
                    with Horizontal(id="pl-edit"):
                        yield Field("Rank", id="f-rank", checks=[integer(1, 99)])
                        yield Field("vCPU", id="f-cpus", checks=[integer(1, 256)])
                        yield Field("Memory MiB", id="f-mem", checks=[integer(128)])
                        yield Field("Depends on", id="f-deps", checks=[max_len(400)])
                        yield Button("Apply", id="f-apply", compact=True)
                    yield Static("NETWORKS", classes="pane-title")
                    yield DataTable(id="pl-nets", cursor_type="row")
                with TabPane("JSON F3", id="pl-json"):
                    yield TextArea(
                        "",
                        id="pl-text",
                        show_line_numbers=True,
                        soft_wrap=False,
                        tab_behavior="indent",
                    )
                with TabPane("Diff F4", id="pl-diff"), VerticalScroll():
                    yield Static("", id="pl-diff-text")
        yield Static("", id="pl-problems")

    def on_mount(self) -> None:
        self.query_one("#pl-list", DataTable).add_columns("PLAN", "VER")
        self.query_one("#pl-machines", DataTable).add_columns(
            "RANK", "MACHINE", "POINT", "CPU", "MiB", "DEPENDS ON", "READY WHEN"
        )
        self.query_one("#pl-nets", DataTable).add_columns("NETWORK", "MODE", "SUBNET", "DHCP")
        self.query_one("#pl-list").focus()
        super().on_mount()

    @work(thread=True, exclusive=True, exit_on_error=False, group="load", name="Loading the plans")
    def load(self) -> None:
        s = self.services
        plans = s.plans()
        versions = {p["name"]: s.plan_versions(p["name"], p["version"]) for p in plans}
        protected = [m for m in s.client.machines() if m["protected"]]
        self.post_message(self.Loaded(plans, versions, protected))

    def on_plans_screen_loaded(self, msg: Loaded) -> None:
        self.plans, self.versions, self.protected = msg.plans, msg.versions, msg.protected
        t = self.query_one("#pl-list", DataTable)
        t.clear()
        for p in self.plans:
            t.add_row(p["name"], f"v{p['version']}", key=p["name"])
        if self.current is None and self.plans:
            self.open_plan(self.plans[0]["name"])
        else:
            self.revalidate()

    @on(DataTable.RowSelected, "#pl-list")
    def _plan_selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.open_plan(str(event.row_key.value))

    def open_plan(self, name: str) -> None:
        self.current = name
        vs = self.versions.get(name) or []
        text = ps.dumps(doc_of(vs[-1])) if vs else ""
        self.query_one("#pl-text", TextArea).load_text(text)
        self.revalidate()

    # -- validation ---------------------------------------------------------------------------

    @on(TextArea.Changed, "#pl-text")
    def revalidate(self) -> None:
        text = self.query_one("#pl-text", TextArea).text
        known = {m["name"] for m in self.protected}
        self.problems = ps.validate_text(text, known) if text.strip() else []
        out = Text()
        if not text.strip():
            out.append(
                "No plan open: pick one on the left, or ^n for a new plan from the "
                "protected machines."
            )
        elif self.problems:
            out.append(
                f"✗ {len(self.problems)} problem(s), not saveable (^g goes to the first):\n",
                style="bold",
            )
            for p in self.problems[:4]:
                out.append(f"  {p}\n")
        else:
            vs = self.versions.get(self.current or "") or []
            saved = vs and ps.dumps(doc_of(vs[-1])) == text
            out.append(
                "✓ valid"
                + (
                    f", saved as v{vs[-1]['version']}"
                    if saved
                    else ", not saved yet (^s saves a new version)"
                )
            )
        self.query_one("#pl-problems", Static).update(out)
        self.render_form(text)
        self.render_diff(text)

    def render_form(self, text: str) -> None:
        mt = self.query_one("#pl-machines", DataTable)
        nt = self.query_one("#pl-nets", DataTable)
        cur = mt.cursor_row
        mt.clear()
        nt.clear()
        try:
            doc = json.loads(text)
            machines = sorted(
                doc.get("machines", []), key=lambda m: (m.get("rank", 0), m.get("machine", ""))
            )
            nets = doc.get("networks", [])
        except (ValueError, AttributeError, TypeError):
            return
        for m in machines:
            if not isinstance(m, dict):
                continue
            mt.add_row(
                str(m.get("rank", "?")),
                str(m.get("machine", "?")),
                str(m.get("restore_point", "latest")),
                str(m.get("cpus", "-")),
                str(m.get("memory_mib", "-")),
                ", ".join(m.get("depends_on", [])) or "-",
                "; ".join(check_summary(c) for c in m.get("checks", []) if isinstance(c, dict))
                or "-",
                key=str(m.get("machine")),
            )
        for n in nets:
            if isinstance(n, dict):
                nt.add_row(
                    str(n.get("name")),
                    str(n.get("mode")),
                    str(n.get("subnet", "-")),
                    "yes" if n.get("dhcp") else "no",
                )
        if mt.row_count:
            mt.move_cursor(row=min(cur, mt.row_count - 1))

    def render_diff(self, text: str) -> None:
        vs = self.versions.get(self.current or "") or []
        out = Text()
        sections: list[tuple[str, list[str]]] = []
        if vs:
            last = ps.dumps(doc_of(vs[-1]))
            if text != last:
                sections.append(
                    (
                        f"Unsaved changes against v{vs[-1]['version']}",
                        ps.diff(last, text, f"v{vs[-1]['version']}", "editor"),
                    )
                )
            if len(vs) > 1:
                prev = ps.dumps(doc_of(vs[-2]))
                sections.append(
                    (
                        f"v{vs[-1]['version']} ({vs[-1]['created_by'] or '?'}, "
                        f"{vs[-1]['created_at'][:16]}) against v{vs[-2]['version']}",
                        ps.diff(prev, last, f"v{vs[-2]['version']}", f"v{vs[-1]['version']}"),
                    )
                )
        if not sections:
            out.append("Nothing to compare: this plan has one version and no unsaved change.")
        for title, lines in sections:
            out.append(title + "\n", style="bold underline")
            for ln in lines:
                style = "bold" if ln.startswith("+") else ("dim" if ln.startswith("-") else "")
                out.append(ln + "\n", style=style)
            out.append("\n")
        self.query_one("#pl-diff-text", Static).update(out)

    @on(DataTable.RowHighlighted, "#pl-machines")
    def _machine_highlighted(self, event: DataTable.RowHighlighted) -> None:
        m = self._doc_machine(str(event.row_key.value))
        if m is None:
            return
        self.query_one("#field-f-rank", Field).value = str(m.get("rank", ""))
        self.query_one("#field-f-cpus", Field).value = str(m.get("cpus", ""))
        self.query_one("#field-f-mem", Field).value = str(m.get("memory_mib", ""))
        self.query_one("#field-f-deps", Field).value = ", ".join(m.get("depends_on", []))

    def _doc(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self.query_one("#pl-text", TextArea).text)
        except ValueError:
            return None
        return doc if isinstance(doc, dict) else None

    def _doc_machine(self, name: str) -> dict[str, Any] | None:
        doc = self._doc()
        for m in (doc or {}).get("machines", []):
            if isinstance(m, dict) and m.get("machine") == name:
                return m
        return None

    @on(Button.Pressed, "#f-apply")
    def apply_form(self) -> None:
        """Write the form's values for the highlighted machine into the JSON document."""
        fields = list(self.query("#pl-edit Field").results(Field))
        if not check_all(fields):
            return
        doc = self._doc()
        mt = self.query_one("#pl-machines", DataTable)
        if doc is None or not mt.row_count:
            self.notify(
                "fix the JSON first (F3): the form edits a valid document",
                title="Form not applied",
                severity="warning",
            )
            return
        name = mt.coordinate_to_cell_key(mt.cursor_coordinate).row_key.value
        vals = {f.input_id: f.value.strip() for f in fields}
        for m in doc.get("machines", []):
            if m.get("machine") == name:
                for key, fid in (("rank", "f-rank"), ("cpus", "f-cpus"), ("memory_mib", "f-mem")):
                    if vals[fid]:
                        m[key] = int(vals[fid])
                deps = [d.strip() for d in vals["f-deps"].split(",") if d.strip()]
                if deps:
                    m["depends_on"] = deps
                else:
                    m.pop("depends_on", None)
        self.query_one("#pl-text", TextArea).load_text(ps.dumps(doc))
        self.revalidate()

    # -- actions ------------------------------------------------------------------------------

    def action_tab(self, tab: str) -> None:
        self.query_one("#pl-tabs", TabbedContent).active = tab
        if tab == "pl-json":
            self.query_one("#pl-text").focus()

    def action_goto_problem(self) -> None:
        if not self.problems:
            self.notify("no problem in this plan", title="Plan valid")
            return
        p = self.problems[0]
        self.action_tab("pl-json")
        self.query_one("#pl-text", TextArea).move_cursor((p.line - 1, max(0, p.column - 1)))

    def action_new(self) -> None:
        names = {p["name"] for p in self.plans}
        n = 1
        while f"plan-{n}" in names:
            n += 1
        self.current = f"plan-{n}"
        if not self.protected:
            self.notify(
                "no protected machine yet: the plan starts empty and is not valid "
                "until you add one",
                title="New plan",
                severity="warning",
            )
        self.query_one("#pl-text", TextArea).load_text(
            ps.dumps(ps.skeleton(self.current, self.protected))
        )
        self.action_tab("pl-json")
        self.revalidate()

    def action_save(self) -> None:
        text = self.query_one("#pl-text", TextArea).text
        self.revalidate()
        if self.problems:
            self.notify(
                f"{len(self.problems)} problem(s): {self.problems[0]}",
                title="Plan not saved",
                severity="error",
                markup=False,
            )
            self.action_goto_problem()
            return
        doc = json.loads(text)
        self.save(doc["name"], doc)

    @work(thread=True, exclusive=True, exit_on_error=False, group="action", name="Saving the plan")
    def save(self, name: str, doc: dict[str, Any]) -> None:
        out = self.services.save_plan(name, doc)
        self.post_message(ActionDone(f"plan {name} saved", f"version {out.get('version', '?')}"))
        self.app.call_from_thread(self.load)
