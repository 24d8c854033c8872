"""A labelled form field that says what is wrong with its value, right under it.

Validation happens before anything is sent: a form calls check() on every field and sends
nothing while one of them reports a problem. The problem is words ("✗ ..."), not a red border
alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Input, Label, Static

Check = Callable[[str], str | None]  # returns the problem, or None when the value is fine


def required(what: str) -> Check:
    return lambda v: None if v.strip() else f"{what} is empty: type one"


def max_len(n: int) -> Check:
    return lambda v: None if len(v) <= n else f"too long: {len(v)} characters, at most {n}"


def name_rule(v: str) -> str | None:
    if v and not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", v):
        return "use letters, digits, '.', '_' or '-', starting with a letter or digit"
    return None


def integer(lo: int | None = None, hi: int | None = None, unit: str = "") -> Check:
    def check(v: str) -> str | None:
        if not v.strip():
            return None
        try:
            n = int(v.strip())
        except ValueError:
            return f"'{v.strip()}' is not a whole number"
        if lo is not None and n < lo:
            return f"at least {lo}{unit}"
        if hi is not None and n > hi:
            return f"at most {hi}{unit}"
        return None

    return check


class Field(Vertical):
    """Label, input and the line that says what is wrong."""

    DEFAULT_CSS = """
    Field { height: auto; margin: 0 0 0 0; }
    Field > .field-error { color: $error; text-style: bold; height: auto; }
    Field > Label { color: $text-muted; }
    """

    def __init__(
        self,
        label: str,
        *,
        id: str,
        checks: list[Check] | None = None,
        value: str = "",
        placeholder: str = "",
        password: bool = False,
        max_length: int = 0,
    ) -> None:
        super().__init__(id=f"field-{id}")
        self.label = label
        self.input_id = id
        self.checks = checks or []
        self._value = value
        self._placeholder = placeholder
        self._password = password
        self._max_length = max_length

    def compose(self) -> ComposeResult:
        yield Label(self.label)
        yield Input(
            self._value,
            compact=True,
            placeholder=self._placeholder,
            password=self._password,
            id=self.input_id,
            max_length=self._max_length,
        )
        yield Static("", classes="field-error")

    @property
    def input(self) -> Input:
        return self.query_one(Input)

    @property
    def value(self) -> str:
        return self.input.value

    @value.setter
    def value(self, v: str) -> None:
        self.input.value = v

    def set_error(self, problem: str | None) -> None:
        err = self.query_one(".field-error", Static)
        err.update(f"✗ {problem}" if problem else "")
        err.display = bool(problem)
        self.input.set_class(bool(problem), "-invalid")

    def check(self, extra: list[Check] | None = None) -> str | None:
        for c in [*self.checks, *(extra or [])]:
            problem = c(self.value)
            if problem:
                self.set_error(problem)
                return problem
        self.set_error(None)
        return None

    def on_mount(self) -> None:
        self.set_error(None)
        self.input.cursor_blink = False  # a steady cursor: calmer on a serial console


def check_all(fields: list[Field], extra: dict[str, list[Check]] | None = None) -> bool:
    """Check every field (all problems shown at once); True when the form may be sent."""
    ok = True
    first: Any = None
    for f in fields:
        if f.check((extra or {}).get(f.input_id)):
            ok = False
            first = first or f
    if first is not None:
        first.input.focus()
    return ok
