"""The top line: where you are and the keys of every screen, visible at all times.

The current screen is marked by reverse video and a '▸', which a monochrome console shows.
"""

from __future__ import annotations

from rich.text import Text
from textual.widget import Widget

# (mode, key, long label, short label for 80 columns)
SCREENS = (
    ("dashboard", "1", "Dashboard", "Dash"),
    ("sources", "2", "Sources", "Sources"),
    ("plans", "3", "Plans", "Plans"),
    ("testrun", "4", "Test runs", "Test"),
    ("cutover", "5", "Cutover", "Cutover"),
    ("calculator", "6", "Calculator", "Calc"),
    ("events", "7", "Events", "Events"),
)
WIDE = 110  # from this width on, the long labels fit


class NavBar(Widget):
    DEFAULT_CSS = "NavBar { height: 1; }"

    def __init__(self, current: str) -> None:
        super().__init__()
        self.current = current

    def render(self) -> Text:
        wide = self.size.width >= WIDE
        t = Text(no_wrap=True, overflow="ellipsis")
        t.append(" FERRYMAN " if wide else " FM ", style="bold reverse")
        for mode, key, long, short in SCREENS:
            label = long if wide else short
            t.append(" ")
            if mode == self.current:
                t.append(f"▸{key} {label}", style="bold reverse")
            else:
                t.append(key, style="bold underline")
                t.append(f" {label}")
        who = getattr(self.app, "identity", {})
        if wide and who:
            me = f"{who.get('user')} ({who.get('role')}) {who.get('origin')} "
            pad = self.size.width - t.cell_len - len(me)
            if pad > 1:
                t.append(" " * pad)
                t.append(me, style="dim")
        return t
