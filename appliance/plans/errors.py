"""Errors of plans, test runs and cutover. Each names the plan, run or machine and the fix."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from appliance.errors import FerrymanError


@dataclass(frozen=True)
class Problem:
    """One validation finding: where in the document, what is wrong, how to fix it."""

    path: str  # JSON path, e.g. "$.machines[0].cpus"
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message} (fix: {self.fix})"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


class PlanError(FerrymanError):
    code = "plan"


class PlanInvalid(PlanError):
    """The document breaks the schema or the rules; ``problems`` lists every finding."""

    code = "plan.invalid"
    http_status = 422

    def __init__(self, plan: str, problems: list[Problem]) -> None:
        first = problems[0]
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(
            f"plan '{plan}' is invalid at {first.path}: {first.message}{more}", hint=first.fix
        )
        self.problems = problems

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(super().to_dict())
        d["problems"] = [p.to_dict() for p in self.problems]
        return d


class RunError(PlanError):
    """A test run or cutover step failed; the message names the machine and the step."""

    code = "plan.run"
    http_status = 500


class ReadinessFailed(RunError):
    code = "plan.readiness"

    def __init__(self, machine: str, check: str, detail: str) -> None:
        super().__init__(
            f"machine '{machine}' never passed its {check} check: {detail}",
            hint="read the console log in the run report; raise the check's timeout_s or "
            "fix the guest",
        )
        self.machine = machine
        self.check = check


class CutoverRefused(PlanError):
    """A cutover step asked out of order, unconfirmed, or on a run in the wrong state."""

    code = "plan.cutover_refused"
    http_status = 409
