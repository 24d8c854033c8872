"""Errors of the conversion subsystem (inspect, preflight, convert, customise, verify, boot).

One root, ConvertError, so the daemon and CLI can catch the subsystem as a whole; each message
names the image or guest, what failed and what to do.
"""

from __future__ import annotations

from appliance.errors import FerrymanError


class ConvertError(FerrymanError):
    code = "convert"
    http_status = 500


class InspectError(ConvertError):
    """libguestfs could not open or make sense of a disk image."""

    code = "convert.inspect"
    http_status = 422


class DamagedDisk(InspectError):
    """The disk has no readable partition table or file system, or the appliance timed out."""

    code = "convert.damaged_disk"


class PreflightRefused(ConvertError):
    """The preflight verdict has blockers; ``blockers`` lists every reason."""

    code = "convert.preflight_refused"
    http_status = 409

    def __init__(self, message: str, *, blockers: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.blockers = blockers


class ConversionFailed(ConvertError):
    code = "convert.failed"


class VerifyFailed(ConvertError):
    code = "convert.verify_failed"

    def __init__(self, message: str, *, problems: list[str], hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.problems = problems


class PlanError(ConvertError):
    """The customisation part of a plan is invalid; the message names the JSON path."""

    code = "convert.plan"
    http_status = 422


class BootError(ConvertError):
    """The boot harness could not start the VM (not: the guest did not boot)."""

    code = "convert.boot"
