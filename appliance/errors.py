"""One root error for the engine; each subsystem subclasses it.

Every message names the object, what went wrong and the fix, in one line, because a field
engineer reads it on a console under time pressure. Library errors are converted at the
boundary with ``raise ... from e``.
"""

from __future__ import annotations


class FerrymanError(Exception):
    """Root of all errors the engine reports to an operator.

    ``hint`` is the next step for the operator; ``code`` is a stable machine-readable name
    used by the API and ``--json`` output.
    """

    code = "error"
    http_status = 400

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_dict(self) -> dict[str, str | None]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


class ConfigError(FerrymanError):
    code = "config"


class StoreError(FerrymanError):
    code = "store"
    http_status = 500


class NotFound(FerrymanError):
    code = "not_found"
    http_status = 404


class Conflict(FerrymanError):
    """A second, conflicting action: one operator wins, the other gets this."""

    code = "conflict"
    http_status = 409


class DaemonError(FerrymanError):
    code = "daemon"
    http_status = 503


class Cancelled(FerrymanError):
    code = "cancelled"
