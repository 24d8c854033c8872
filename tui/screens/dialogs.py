"""Confirmations. A destructive or trust decision is never one stray key: the operator
presses a named button, or types the object's name where the step cannot be undone."""

from __future__ import annotations

from typing import Any

from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Input, Static

from tui.screens.base import FerrymanModal


class ConfirmDialog(FerrymanModal):
    """Dismisses with True only on the confirm button (and the typed word, if asked)."""

    def __init__(self, title: str, body: str, confirm: str, *, type_to_confirm: str = "") -> None:
        super().__init__()
        self.title_text, self.body, self.confirm = title, body, confirm
        self.word = type_to_confirm

    def compose_dialog(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.title_text, classes="dialog-title")
            yield Static(self.body, classes="dialog-body")
            if self.word:
                yield Static(f"Type {self.word} to confirm:")
                yield Input(id="word", compact=True)
                yield Static("", id="word-error", classes="field-error")
            with Horizontal(classes="buttons"):
                yield Button(self.confirm, variant="error", id="yes", compact=True)
                yield Button("Cancel  esc", id="no", compact=True)

    def on_mount(self) -> None:
        for w in self.query(Input):
            w.cursor_blink = False
        self.query_one("#word" if self.word else "#no").focus()

    def on_input_submitted(self) -> None:
        self._confirm()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "yes":
            self._confirm()
        else:
            self.dismiss(False)

    def _confirm(self) -> None:
        if self.word and self.query_one("#word", Input).value.strip() != self.word:
            self.query_one("#word-error", Static).update(
                f"✗ type exactly {self.word} (nothing was done)"
            )
            return
        self.dismiss(True)


class ThumbprintDialog(FerrymanModal):
    """First contact with a TLS endpoint whose certificate no system CA vouches for."""

    def __init__(self, uri: str, cert: dict[str, Any]) -> None:
        super().__init__()
        self.uri, self.cert = uri, cert

    def compose_dialog(self) -> ComposeResult:
        c = self.cert
        fp = str(c.get("thumbprint", "")).replace(":", "").lower()  # any spelling
        pairs = ":".join(fp[i : i + 2] for i in range(0, len(fp), 2)).upper()
        with Vertical(classes="dialog"):
            yield Static("! Certificate not trusted by any system CA", classes="dialog-title")
            yield Static(
                f"{self.uri} presents:\n"
                f"  subject  {c.get('subject', '?')}\n"
                f"  issuer   {c.get('issuer', '?')}\n"
                f"  valid to {c.get('not_after', '?')}\n"
                f"  names    {', '.join(c.get('names') or []) or '-'}\n"
                f"  SHA-256  {pairs}\n\n"
                "Compare the SHA-256 with the one the vCenter/ESXi administrator reads from "
                "the server. Trusting pins exactly this certificate; a different one later is "
                "refused.",
                classes="dialog-body",
            )
            with Horizontal(classes="buttons"):
                yield Button("Trust this certificate", variant="warning", id="trust", compact=True)
                yield Button("Cancel  esc", id="no", compact=True)

    def on_mount(self) -> None:
        self.query_one("#no").focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.cert.get("thumbprint") if event.button.id == "trust" else None)
