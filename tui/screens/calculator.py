"""The planning calculator (tui/calc.py): type the numbers, read the answer. Nothing is sent."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Static

from tui import calc
from tui import format as fmt
from tui.screens.base import FerrymanScreen
from tui.widgets.common.fields import Field

DEFAULTS = {"data": "2 TiB", "link": "1 Gbit/s", "eff": "70", "change": "3", "overhead": "30"}


def _check(fn):  # type: ignore[no-untyped-def]
    def check(v: str) -> str | None:
        try:
            fn(v)
        except calc.InputError as e:
            return str(e)
        return None

    return check


def _overhead(v: str) -> float:
    try:
        n = float(v)
    except ValueError:
        raise calc.InputError("type seconds, e.g. 30") from None
    if not 0 <= n <= 3600:
        raise calc.InputError("use 0 to 3600 seconds")
    return n


class CalculatorScreen(FerrymanScreen):
    NAV = "calculator"
    auto_refresh = False
    BINDINGS = [Binding("tab", "app.focus_next", "Next field"), Binding("escape", "blur", "Done")]

    def compose_body(self) -> ComposeResult:
        with Horizontal(id="calc"):
            with Vertical(id="calc-form"):
                yield Field(
                    "Used data to copy",
                    id="data",
                    value=DEFAULTS["data"],
                    checks=[_check(calc.parse_size)],
                )
                yield Field(
                    "Link speed",
                    id="link",
                    value=DEFAULTS["link"],
                    checks=[_check(calc.parse_link)],
                )
                yield Field(
                    "Efficiency of the link (%)",
                    id="eff",
                    value=DEFAULTS["eff"],
                    checks=[_check(calc.parse_percent)],
                )
                yield Field(
                    "Daily change rate (% of data)",
                    id="change",
                    value=DEFAULTS["change"],
                    checks=[_check(lambda v: calc.parse_percent(v, high=100))],
                )
                yield Field(
                    "Fixed cost per sync (s)",
                    id="overhead",
                    value=DEFAULTS["overhead"],
                    checks=[_check(_overhead)],
                )
            yield Static("", id="calc-result")

    def on_mount(self) -> None:
        super().on_mount()
        self.compute()

    def on_input_changed(self) -> None:
        self.compute()

    def action_blur(self) -> None:
        self.set_focus(None)

    def compute(self) -> None:
        fields = {f.input_id: f for f in self.query(Field)}
        if any(f.check() for f in fields.values()):
            self.query_one("#calc-result", Static).update(
                "✗ fix the field marked ✗ to see the result"
            )
            return
        p = calc.plan(
            calc.parse_size(fields["data"].value),
            calc.parse_link(fields["link"].value),
            calc.parse_percent(fields["eff"].value),
            calc.parse_percent(fields["change"].value),
            _overhead(fields["overhead"].value),
        )
        t = Text()
        rows = [
            ("effective throughput", f"{fmt.rate(p.throughput_Bps)}"),
            ("initial full sync", f"{fmt.duration(p.initial_sync_s)}"),
            ("average change", f"{fmt.rate(p.change_Bps)} ({p.utilisation:.1%} of the link)"),
            ("incremental cadence", fmt.short(p.cadence_s) if p.cadence_s else "none fits"),
            ("each incremental", fmt.duration(p.incremental_s) if p.incremental_s else "-"),
            ("RPO you can promise", fmt.short(p.promised_rpo_s) if p.promised_rpo_s else "NONE"),
        ]
        for k, v in rows:
            t.append(f"{k:<22}", style="bold")
            t.append(f"{v}\n")
        t.append("\n")
        t.append(
            ("✓ " if p.promised_rpo_s else "✗ ") + p.verdict + "\n",
            style="bold" if not p.promised_rpo_s else "",
        )
        t.append(
            "\nAssumes changes spread over the day and half of each interval kept free "
            "for bursts. Measure the real change rate with a week of syncs.",
            style="dim",
        )
        self.query_one("#calc-result", Static).update(t)
