"""Turn a failed worker into one notification: the title says what failed, the body what to do.

Worker.StateChanged does not bubble, so every screen forwards it here (screens/base.py); this
is the one place that decides how a failure reads. Repeats within REPEAT_S are dropped, so a
daemon that is down gives one message, not one a second.
"""

from __future__ import annotations

import logging
import time

from textual.app import App
from textual.worker import Worker, WorkerState

from appliance.errors import FerrymanError

log = logging.getLogger(__name__)
REPEAT_S = 30.0  # the same failure again within 30 s is logged, not shown again


def describe(worker_name: str, error: BaseException | None) -> tuple[str, str]:
    what = worker_name or "A background task"
    if isinstance(error, FerrymanError):
        body = error.message + (f"\n→ {error.hint}" if error.hint else "")
    else:
        body = (
            f"{type(error).__name__}: {error}\n→ this is a bug in the TUI; the job in "
            "ferrymand is not affected. Report it with the log (FERRYMAN_LOG_DIR/tui.log)."
        )
    return f"{what} failed", body


def report(app: App[object], event: Worker.StateChanged) -> None:
    if event.state != WorkerState.ERROR:
        return
    worker: Worker[object] = event.worker
    title, body = describe(worker.name, worker.error)
    log.warning("%s: %s", title, body, exc_info=worker.error)
    seen: dict[tuple[str, str], float] = app.__dict__.setdefault("_failures_seen", {})
    key = (title, body)
    t = time.monotonic()
    if t - seen.get(key, -REPEAT_S) < REPEAT_S:
        return
    seen[key] = t
    app.notify(body, title=title, severity="error", timeout=12, markup=False)
