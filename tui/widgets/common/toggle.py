"""A checkbox that says its state in characters: [x] on, [ ] off.

Textual's Checkbox always draws an 'X' and tells on from off by colour only, which a
monochrome serial console cannot show.
"""

from __future__ import annotations

from textual.content import Content
from textual.widgets import Checkbox


class Toggle(Checkbox):
    @property
    def _button(self) -> Content:
        return Content("[x]" if self.value else "[ ]")
