"""The Ferryman TUI. The App only wires things: modes (one per screen of the nav bar), global
keys, the command palette and the theme. Screens own their data; every call to ferrymand runs
in a thread worker (screens/base.py), so the screen never freezes on a slow call.

Quitting leaves every job running: jobs live in ferrymand, this is only a window onto them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Mapping
from functools import partial
from importlib import import_module
from pathlib import Path

from textual import work
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.theme import Theme
from textual.worker import Worker

from appliance.config import paths
from tui import failures
from tui.messages import ActionDone, JobSubmitted, OpenMachine
from tui.screens.dashboard import DashboardScreen
from tui.services import Services
from tui.widgets.common.navbar import SCREENS, NavBar

log = logging.getLogger(__name__)

# High contrast, few colours; on a 16-colour or monochrome console every state still reads
# through its word and symbol (tui/format.py).
FERRYMAN_THEME = Theme(
    name="ferryman",
    primary="#5fafd7",
    secondary="#87afaf",
    accent="#d7af5f",
    foreground="#e4e4e4",
    background="#121212",
    surface="#1c1c1c",
    panel="#262626",
    success="#87d787",
    warning="#ffd75f",
    error="#ff5f5f",
    dark=True,
)
GIL_SWITCH_S = 0.001
MONO_TERMS = ("linux", "vt100", "vt102", "vt220", "ansi", "dumb")
ANSI_THEME = "ansi-dark"  # Textual's theme of the terminal's own ANSI colours


def pick_theme(env: Mapping[str, str], available: Iterable[str]) -> str:
    """FERRYMAN_THEME if Textual knows it; the terminal's own 16 colours on a console that
    has no more (Textual's 'ansi-dark'); else ours. An unknown name never stops the TUI."""
    wanted = env.get("FERRYMAN_THEME", "")
    if wanted in available:
        return wanted
    if wanted:
        log.warning("FERRYMAN_THEME=%s is not a theme; using the default", wanted)
    return ANSI_THEME if env.get("TERM", "") in MONO_TERMS else "ferryman"


class FerrymanApp(App[None]):
    TITLE = "Ferryman"
    CSS_PATH = "ferryman.tcss"
    # Only the dashboard is imported at start-up (time to a drawn dashboard is a benchmark);
    # the other screens and what they need (jsonschema, TextArea...) load on first use.
    DEFAULT_MODE = "dashboard"  # the first screen, without a mode switch (and its style pass)
    MODES = {
        "dashboard": DashboardScreen,
        "sources": lambda: _lazy("sources", "SourcesScreen"),
        "plans": lambda: _lazy("plans", "PlansScreen"),
        "testrun": lambda: _lazy("testrun", "TestRunScreen"),
        "cutover": lambda: _lazy("cutover", "CutoverScreen"),
        "calculator": lambda: _lazy("calculator", "CalculatorScreen"),
        "events": lambda: _lazy("events", "EventsScreen"),
    }
    BINDINGS = [
        *(
            Binding(key, f"switch_mode('{mode}')", label, show=False)
            for mode, key, label, _ in SCREENS
        ),
        Binding("q", "quit", "Quit (jobs go on)"),
    ]

    def __init__(self, services: Services | None = None) -> None:
        super().__init__()
        self.services = services or Services()
        self.machine_names: list[str] = []  # last seen by the dashboard, for the palette
        self.identity: dict[str, str] = {}  # user, role, origin as the daemon sees us
        # The theme before the first style pass: set later, it makes Textual parse and apply
        # the whole stylesheet again (three passes instead of one at start-up).
        self.register_theme(FERRYMAN_THEME)
        self.theme = pick_theme(os.environ, self.available_themes)

    async def on_mount(self) -> None:
        # Worker threads decode the daemon's JSON holding the GIL; hand it back to the event
        # loop every 1 ms instead of 5 so keys and repaints do not wait behind a refresh.
        sys.setswitchinterval(GIL_SWITCH_S)
        self.login()

    @work(thread=True, exclusive=True, exit_on_error=False, name="Opening the session")
    def login(self) -> None:
        """The daemon records the session (who, from where) in the audit trail."""
        who = self.services.client.login()
        self.call_from_thread(self._logged_in, who)

    def _logged_in(self, who: dict[str, str]) -> None:
        self.identity = who
        for bar in self.screen.query(NavBar):
            bar.refresh()

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        failures.report(self, event)

    # -- cross-screen requests -------------------------------------------------------------

    def on_open_machine(self, message: OpenMachine) -> None:
        self.push_screen(_lazy("machine", "MachineScreen", message.name))

    def on_job_submitted(self, message: JobSubmitted) -> None:
        job = message.job
        self.notify(
            f"job {job['id']} ({job['kind']}) is {job['state']}; it runs in ferrymand "
            "and goes on if you quit",
            title=message.what,
        )

    def on_action_done(self, message: ActionDone) -> None:
        self.notify(message.detail or " ", title=message.title)

    # -- command palette ---------------------------------------------------------------------

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        for mode, key, label, _ in SCREENS:
            yield SystemCommand(f"Go to {label}", f"key {key}", partial(self.switch_mode, mode))
        for name in self.machine_names:
            yield SystemCommand(
                f"Open machine {name}",
                "disks, restore points, sync history",
                partial(self.post_message, OpenMachine(name)),
            )
        yield SystemCommand(
            "Add a source", "vSphere, libvirt, NBD or Linux agent", self._add_source
        )
        yield SystemCommand(
            "Reset the demo lab",
            "remove the lab VM, its cutover targets, networks, disks, source and points",
            self.reset_lab,
        )
        yield SystemCommand("Quit", "leaves every job running in ferrymand", self.exit)
        yield from (
            c
            for c in super().get_system_commands(screen)
            if c.title in ("Theme", "Keys", "Screenshot")
        )

    @work(thread=True, exclusive=True, exit_on_error=False, group="lab")
    def reset_lab(self) -> None:
        """scripts/demo --reset, from the TUI (blocking: libvirt and the API, in a worker)."""
        import io
        from contextlib import redirect_stdout

        from appliance import demo

        with redirect_stdout(io.StringIO()):  # the story's lines would garble the screen
            done = demo.reset(self.services.client, demo.Story())
        self.post_message(ActionDone("Lab reset", ", ".join(done) or "nothing to remove"))

    def _add_source(self) -> None:
        self.switch_mode("sources")
        self.call_later(lambda: self.screen.run_action("add"))


def _lazy(module: str, cls: str, *args: object) -> Screen[None]:
    screen: Screen[None] = getattr(import_module(f"tui.screens.{module}"), cls)(*args)
    return screen


def _log_to_file() -> None:
    """Logs go to a file: the terminal belongs to the TUI."""
    d = paths().log_dir
    try:
        d.mkdir(parents=True, exist_ok=True)
        target = d / "tui.log"
        target.touch()
    except OSError:
        target = Path(os.environ.get("TMPDIR", "/tmp")) / f"ferryman-tui-{os.getuid()}.log"
    logging.basicConfig(
        filename=target, level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )


def run() -> int:
    _log_to_file()
    FerrymanApp().run()
    return 0
