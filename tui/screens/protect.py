"""Protect a machine, or change its protection: RPO target, throttle, verify every sync."""

from __future__ import annotations

from typing import Any

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Static

from tui.messages import ActionDone
from tui.screens.base import FerrymanModal
from tui.widgets.common.fields import Field, check_all, max_len
from tui.widgets.common.toggle import Toggle

MIN_RPO_S = 60  # the daemon refuses shorter targets
MIN_THROTTLE_BPS = 64 * 1024  # the daemon refuses lower limits
_UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_rpo(text: str) -> int:
    """'15m', '900', '1h' -> seconds. ValueError says what to type."""
    t = text.strip().lower()
    if not t:
        raise ValueError("the RPO target is empty: type one, e.g. 15m")
    unit = _UNITS_S.get(t[-1])
    num = t[:-1] if unit else t
    try:
        secs = int(float(num) * (unit or 1))
    except ValueError:
        raise ValueError(f"'{text.strip()}' is not a duration: type e.g. 15m, 1h or 900") from None
    if secs < MIN_RPO_S:
        raise ValueError(f"{secs} s is too short: at least {MIN_RPO_S} s (1m)")
    return secs


def parse_throttle(text: str) -> int | None:
    """'' -> no limit; '50' = 50 MiB/s; '512K', '2G' (bytes per second)."""
    t = text.strip().upper().removesuffix("/S").removesuffix("B").removesuffix("I")
    if not t:
        return None
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3}.get(t[-1])
    num = t[:-1] if mult else t
    try:
        bps = int(float(num) * (mult or 1024**2))
    except ValueError:
        raise ValueError(
            f"'{text.strip()}' is not a rate: type e.g. 50M or 512K, or leave it empty for no limit"
        ) from None
    if bps < MIN_THROTTLE_BPS:
        raise ValueError("too low: at least 64K (bytes per second), or empty for no limit")
    return bps


def check_with(parser: Any) -> Any:
    """A field check from a parser that raises ValueError with the words to show."""

    def check(v: str) -> str | None:
        try:
            parser(v)
        except ValueError as e:
            return str(e)
        return None

    return check


class ProtectDialog(FerrymanModal):
    BINDINGS = [Binding("ctrl+s", "save", "Save"), Binding("escape", "dismiss_none", "Cancel")]

    def __init__(self, name: str, machine: dict[str, Any] | None) -> None:
        super().__init__()
        self.machine_name = name
        self.machine = machine or {}

    def compose_dialog(self) -> ComposeResult:
        m = self.machine
        rpo = m.get("rpo_seconds")
        thr = m.get("throttle_bps")
        with Vertical(classes="dialog"):
            verb = "Change protection of" if m.get("protected") else "Protect"
            yield Static(f"{verb} {self.machine_name}", classes="dialog-title")
            yield Field(
                "RPO target (e.g. 15m, 1h; at least 1m)",
                id="rpo",
                value=f"{rpo // 60}m" if rpo else "15m",
                checks=[max_len(12), check_with(parse_rpo)],
            )
            yield Field(
                "Throttle (bytes/s, e.g. 50M; empty = no limit)",
                id="throttle",
                value=f"{thr // 1024**2}M" if thr else "",
                checks=[max_len(12), check_with(parse_throttle)],
            )
            yield Toggle(
                "verify every sync (block-hash compare; costs a read)",
                value=bool(m.get("verify_every_sync")),
                id="verify",
                compact=True,
            )
            with Horizontal(classes="buttons"):
                yield Button("Save  ^s", variant="primary", id="save", compact=True)
                yield Button("Cancel  esc", id="cancel", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "save":
            self.action_save()
        else:
            self.dismiss(None)

    def action_save(self) -> None:
        fields = list(self.query(Field))
        if not check_all(fields):
            return
        rpo = parse_rpo(self.query_one("#field-rpo", Field).value)
        thr = parse_throttle(self.query_one("#field-throttle", Field).value)
        self.send(rpo, thr, self.query_one("#verify", Toggle).value)

    @work(thread=True, exclusive=True, exit_on_error=False, name="Saving the protection")
    def send(self, rpo: int, throttle: int | None, verify: bool) -> None:
        c = self.services.client
        if self.machine.get("protected"):
            c.set_machine(
                self.machine_name,
                rpo_seconds=rpo,
                throttle_bps=throttle,
                verify_every_sync=verify,
                clear_throttle=throttle is None,
            )
        else:
            c.protect(
                self.machine_name, rpo_seconds=rpo, throttle_bps=throttle, verify_every_sync=verify
            )
        self.post_message(
            ActionDone(
                f"{self.machine_name} protected",
                f"RPO target {rpo // 60} min; the scheduler takes it from here",
            )
        )
        self.app.call_from_thread(self.dismiss, True)
