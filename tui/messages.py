"""Messages shared by several screens. Requests are named as commands, results in the past
tense. Messages that belong to one widget are nested on it instead."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from textual.message import Message


@dataclass
class OpenMachine(Message):
    """Show the machine screen for this machine."""

    name: str


@dataclass
class JobSubmitted(Message):
    """The daemon accepted a job; the job now lives in ferrymand, not in this TUI."""

    what: str
    job: dict[str, Any]


@dataclass
class JobProgressed(Message):
    """A newer progress reading of one job. Floods collapse: only the newest is handled."""

    job: dict[str, Any]

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, JobProgressed) and message.job.get("id") == self.job.get("id")


@dataclass
class ActionDone(Message):
    """An action the daemon completed at once (added, removed, protected ...)."""

    title: str
    detail: str = ""
