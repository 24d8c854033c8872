"""What every Ferryman screen shares: the navigation bar, the footer with key hints, periodic
refresh that pauses while the screen is hidden, and forwarding worker failures to the one
failure reporter (Worker.StateChanged does not bubble)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from textual.app import ComposeResult
from textual.events import Key
from textual.screen import ModalScreen, Screen
from textual.timer import Timer
from textual.widgets import Footer, Input, TextArea
from textual.worker import Worker

from tui import failures
from tui.widgets.common.navbar import NavBar

if TYPE_CHECKING:
    from tui.app import FerrymanApp
    from tui.services import Services


class Reports:
    """Mixin: worker failures of this node go to tui.failures.report."""

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        failures.report(cast(Any, self).app, event)

    @property
    def services(self) -> Services:
        return cast("FerrymanApp", cast(Any, self).app).services


class FerrymanScreen(Reports, Screen[None]):
    """A top-level screen. Subclasses yield their body from compose_body and implement
    load() as a thread worker that posts its results."""

    NAV: str = ""  # the mode this screen belongs to, highlighted in the nav bar
    auto_refresh: bool = True

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield NavBar(self.NAV)
        yield from self.compose_body()
        yield Footer()

    def compose_body(self) -> ComposeResult:
        yield from ()

    def on_mount(self) -> None:
        for w in self.query("Input, TextArea"):
            w.cursor_blink = False  # type: ignore[attr-defined]  # steady, and snapshots too
        self.load()
        if self.auto_refresh and self.services.refresh_s > 0:
            self._timer = self.set_interval(self.services.refresh_s, self.tick)

    def on_key(self, event: Key) -> None:
        # Escape leaves a text field, so that the screen keys (1-7, letters) work again.
        if event.key == "escape" and isinstance(self.focused, (Input, TextArea)):
            self.set_focus(None)
            event.stop()
            event.prevent_default()

    def tick(self) -> None:
        # Skip a beat rather than pile up threads when the daemon is slow.
        if not any(w.is_running for w in self.own_workers() if w.group == "load"):
            self.load()

    def on_screen_suspend(self) -> None:
        if self._timer:
            self._timer.pause()

    def on_screen_resume(self) -> None:
        if self._timer:
            self._timer.resume()
            self.tick()

    def load(self) -> None:
        """Start the refresh worker (group 'load')."""

    def own_workers(self) -> list[Worker[Any]]:
        return [w for w in self.app.workers if w.node is self]


class FerrymanModal(Reports, ModalScreen[Any]):
    """A dialog; Escape always leaves it without sending anything."""

    BINDINGS = [("escape", "dismiss_none", "Cancel")]

    def compose(self) -> ComposeResult:
        yield from self.compose_dialog()
        yield Footer()  # the dialog's own keys, not those of the screen below

    def compose_dialog(self) -> ComposeResult:
        yield from ()

    def action_dismiss_none(self) -> None:
        self.dismiss(None)
