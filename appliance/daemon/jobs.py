"""The job runner: jobs outlive every client, one job per machine at a time.

A job is a row in ``jobs`` plus a thread in this daemon. The row is the truth: after a crash
the next daemon finds rows still 'queued' or 'running' and either resumes them (kinds that
declare themselves resumable, e.g. a sync whose journal says what is durable) or marks them
'interrupted' with the reason. Nothing is silently lost.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlite_utils import Database

from appliance.errors import Cancelled, Conflict, FerrymanError, NotFound
from store.db import dumps, loads, now
from store.records import add_event

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
PROGRESS_PERSIST_S = 1.0  # write progress to the store at most once a second
MAX_RESUMES = 3  # a job that keeps killing the daemon is not resumed forever
RATE_WINDOW_S = 5.0  # rate is averaged over this window: stable ETA on a noisy link
RATE_MIN_STEPS = 3  # ... and over at least this many progress steps (a slow link)


class Progress:
    """Bytes (or steps) done, rate and ETA; shared between the job thread and API readers."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.total = 0
        self.done = 0
        self.phase = ""
        self.extra: dict[str, Any] = {}
        self._samples: list[tuple[float, int]] = []

    def set_total(self, total: int) -> None:
        with self._lock:
            self.total = total

    def update(self, n: int) -> None:
        """Add n units done (the copier's progress interface: size + update(n))."""
        with self._lock:
            self.done += n
            t = self._clock()
            self._samples.append((t, self.done))
            # Keep what a window ending at a later "now" may need, and the last few steps.
            while (
                len(self._samples) > RATE_MIN_STEPS + 1
                and t - self._samples[1][0] > 2 * RATE_WINDOW_S
            ):
                self._samples.pop(0)

    def set_phase(self, phase: str, **extra: Any) -> None:
        with self._lock:
            self.phase = phase
            self.extra.update(extra)

    def _rate(self, now: float) -> float:
        """Units per second over the window that ends NOW, not at the last update: on a link
        that slows down or stops, the rate falls and the ETA grows instead of freezing."""
        s = self._samples
        if not s:
            return 0.0
        older = [i for i, x in enumerate(s) if x[0] <= now - RATE_WINDOW_S]
        i = older[-1] if older else 0
        # A slow link completes a request every few seconds: span at least the last few
        # steps, spread until now (a pause makes the rate fall, the ETA grow).
        i = max(0, min(i, len(s) - 1 - RATE_MIN_STEPS))
        ref = s[i]
        return (self.done - ref[1]) / (now - ref[0]) if now > ref[0] else 0.0

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            rate = self._rate(self._clock())
            eta = (self.total - self.done) / rate if rate > 0 and self.total else None
            return {
                "phase": self.phase,
                "done": self.done,
                "total": self.total,
                "rate": rate,
                "eta_s": eta,
                **self.extra,
            }


@dataclass
class JobContext:
    """What a job function gets: its parameters, a store of its own, progress, cancel."""

    job_id: int
    kind: str
    machine_id: int | None
    params: dict[str, Any]
    db: Database
    progress: Progress
    cancel: threading.Event
    resumed: bool = False
    live: dict[str, Any] = field(default_factory=dict)  # settings changed while running
    on_live: Callable[[dict[str, Any]], None] | None = None  # e.g. the copier's throttle

    def event(self, message: str, level: str = "info", **details: Any) -> None:
        add_event(
            self.db,
            message,
            level=level,
            kind=self.kind,
            machine_id=self.machine_id,
            job_id=self.job_id,
            details=details,
        )

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            raise Cancelled(f"job {self.job_id} ({self.kind}) was cancelled")


JobFn = Callable[[JobContext], dict[str, Any] | None]


@dataclass(frozen=True)
class JobSpec:
    kind: str
    run: JobFn
    resumable: bool = False  # may be started again after a daemon crash
    needs_machine: bool = False
    singleton: bool = False  # at most one of this kind at a time, machine or not
    description: str = ""


@dataclass
class _Running:
    ctx: JobContext
    thread: threading.Thread


class JobRunner:
    def __init__(
        self,
        db_factory: Callable[[], Database],
        specs: list[JobSpec],
        *,
        max_running: int = 4,
    ) -> None:
        self._db_factory = db_factory
        # The runner's own connection, shared by API threads: every use holds _dblock.
        self._db = db_factory()
        self._dblock = threading.RLock()
        self.specs = {s.kind: s for s in specs}
        self._lock = threading.Lock()
        self._running: dict[int, _Running] = {}
        self._slots = threading.Semaphore(max_running)
        self._stopping = threading.Event()

    # -- start-up ---------------------------------------------------------------------------

    def recover(self) -> list[dict[str, Any]]:
        """Handle jobs a previous daemon left active. Returns what was done, for the log."""
        out: list[dict[str, Any]] = []
        with self._dblock:
            return self._recover(out)

    def _recover(self, out: list[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT id, kind, machine_id, state, attempts, daemon_pid FROM jobs "
            "WHERE state IN ('queued','running') ORDER BY id"
        ).fetchall()
        for job_id, kind, machine_id, state, attempts, pid in rows:
            spec = self.specs.get(kind)
            if spec and spec.resumable and attempts < MAX_RESUMES:
                self._db.execute("UPDATE jobs SET state='queued' WHERE id=?", [job_id])
                add_event(
                    self._db,
                    f"job {job_id} ({kind}) resumes after a daemon restart",
                    kind="job",
                    machine_id=machine_id,
                    job_id=job_id,
                )
                self._start(job_id, resumed=True)
                out.append({"id": job_id, "action": "resumed"})
            else:
                why = f"ferrymand (pid {pid}) stopped while this job was {state}; start it again"
                if spec and spec.resumable:
                    why = f"interrupted {attempts} times; not resumed again, start it by hand"
                self._finish(job_id, "interrupted", error=why)
                add_event(
                    self._db,
                    f"job {job_id} ({kind}) interrupted: {why}",
                    level="warning",
                    kind="job",
                    machine_id=machine_id,
                    job_id=job_id,
                )
                out.append({"id": job_id, "action": "interrupted"})
        return out

    # -- API --------------------------------------------------------------------------------

    def submit(
        self,
        kind: str,
        *,
        machine_id: int | None = None,
        params: dict[str, Any] | None = None,
        who: str = "",
        origin: str = "",
    ) -> dict[str, Any]:
        spec = self.specs.get(kind)
        if spec is None:
            raise NotFound(
                f"unknown job kind '{kind}'", hint=f"one of: {', '.join(sorted(self.specs))}"
            )
        if spec.needs_machine and machine_id is None:
            raise FerrymanError(f"job '{kind}' needs a machine", hint="name the machine")
        if self._stopping.is_set():
            raise Conflict("ferrymand is shutting down", hint="retry when it is back")
        with self._dblock:
            self._refuse_conflicts(spec, machine_id)
            cur = self._db.execute(
                "INSERT INTO jobs (kind, machine_id, state, params, requested_by, origin, "
                "created_at) VALUES (?,?,?,?,?,?,?)",
                [kind, machine_id, "queued", dumps(params or {}), who, origin, now()],
            )
            job_id = int(cur.lastrowid or 0)
            add_event(
                self._db,
                f"job {job_id} ({kind}) queued by {who or 'unknown'}",
                kind="job",
                machine_id=machine_id,
                job_id=job_id,
            )
        self._start(job_id, resumed=False)
        return self.get(job_id)

    def _refuse_conflicts(self, spec: JobSpec, machine_id: int | None) -> None:
        if machine_id is not None:
            row = self._db.execute(
                "SELECT id, kind FROM jobs WHERE machine_id=? AND state IN ('queued','running')",
                [machine_id],
            ).fetchone()
            if row:
                raise Conflict(
                    f"machine {machine_id} already has job {row[0]} ({row[1]}) running",
                    hint=f"wait for it or cancel it: ferryman job cancel {row[0]}",
                )
        if spec.singleton:
            row = self._db.execute(
                "SELECT id FROM jobs WHERE kind=? AND state IN ('queued','running')",
                [spec.kind],
            ).fetchone()
            if row:
                raise Conflict(
                    f"a {spec.kind} job ({row[0]}) is already running", hint="wait for it to finish"
                )

    def cancel(self, job_id: int) -> dict[str, Any]:
        job = self.get(job_id)
        if job["state"] not in ACTIVE:
            raise Conflict(f"job {job_id} is already {job['state']}", hint="nothing to cancel")
        with self._lock:
            running = self._running.get(job_id)
        if running:
            running.ctx.cancel.set()
        return self.get(job_id)

    def set_live(self, machine_id: int, **values: Any) -> None:
        """Change a setting of the running job of a machine (throttle) without restarting it."""
        with self._lock:
            for r in self._running.values():
                if r.ctx.machine_id == machine_id:
                    r.ctx.live.update(values)
                    if r.ctx.on_live is not None:
                        r.ctx.on_live(values)

    def live_progress(self, job_id: int) -> dict[str, Any] | None:
        with self._lock:
            r = self._running.get(job_id)
        return r.ctx.progress.snapshot() if r else None

    def get(self, job_id: int) -> dict[str, Any]:
        with self._dblock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", [job_id]).fetchone()
        if row is None:
            raise NotFound(f"no job {job_id}", hint="list jobs with: ferryman jobs")
        return self._row(row)

    def list_jobs(self, *, active_only: bool = False, limit: int = 100) -> list[dict[str, Any]]:
        where = "WHERE state IN ('queued','running')" if active_only else ""
        with self._dblock:
            rows = self._db.execute(
                f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", [limit]
            ).fetchall()
        return [self._row(r) for r in rows]

    def _row(self, row: tuple[Any, ...]) -> dict[str, Any]:
        job = dict(zip(self._columns(), row, strict=True))
        for k in ("params", "progress", "result"):
            job[k] = loads(job[k]) if job[k] else ({} if k != "result" else None)
        live = self.live_progress(job["id"])
        if live is not None:
            job["progress"] = live
        return job

    def _columns(self) -> list[str]:
        if not hasattr(self, "_cols"):
            with self._dblock:
                cur = self._db.execute("SELECT * FROM jobs LIMIT 0")
                self._cols = [d[0] for d in cur.description]
        return self._cols

    def wait_idle(self, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if not self._running:
                    return True
            time.sleep(0.05)
        return False

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting jobs, cancel the running ones, wait a little.

        Jobs still running when the process exits stay 'running' in the store and are
        handled by recover() at the next start, exactly like after a crash.
        """
        self._stopping.set()
        with self._lock:
            running = list(self._running.values())
        for r in running:
            r.ctx.cancel.set()
        for r in running:
            r.thread.join(timeout)

    # -- execution --------------------------------------------------------------------------

    def _start(self, job_id: int, *, resumed: bool) -> None:
        with self._dblock:
            row = self._db.execute(
                "SELECT kind, machine_id, params FROM jobs WHERE id=?", [job_id]
            ).fetchone()
        kind, machine_id, params = row
        spec = self.specs[kind]
        ctx = JobContext(
            job_id=job_id,
            kind=kind,
            machine_id=machine_id,
            params=loads(params) or {},
            db=self._db,
            progress=Progress(),
            cancel=threading.Event(),
            resumed=resumed,
        )
        t = threading.Thread(
            target=self._run, args=(spec, ctx), name=f"job-{job_id}-{kind}", daemon=True
        )
        with self._lock:
            self._running[job_id] = _Running(ctx, t)
        t.start()

    def _run(self, spec: JobSpec, ctx: JobContext) -> None:
        db = self._db_factory()  # one connection per thread
        ctx.db = db
        stop_persist = threading.Event()
        try:
            self._slots.acquire()
            try:
                if ctx.cancel.is_set():
                    raise Cancelled(f"job {ctx.job_id} ({spec.kind}) was cancelled")
                db.execute(
                    "UPDATE jobs SET state='running', started_at=COALESCE(started_at, ?), "
                    "daemon_pid=?, attempts=attempts+1 WHERE id=?",
                    [now(), os.getpid(), ctx.job_id],
                )
                persister = threading.Thread(
                    target=self._persist_progress, args=(ctx, stop_persist), daemon=True
                )
                persister.start()
                result = spec.run(ctx)
                stop_persist.set()
                self._finish(
                    ctx.job_id, "succeeded", result=result, db=db, progress=ctx.progress.snapshot()
                )
                ctx.event(f"job {ctx.job_id} ({spec.kind}) succeeded")
            finally:
                self._slots.release()
        except Cancelled as e:
            stop_persist.set()
            if self._stopping.is_set():
                # Daemon shutdown, not an operator's cancel: leave it for recover().
                log.info("job %s left for the next start: daemon stopping", ctx.job_id)
            else:
                self._finish(ctx.job_id, "cancelled", error=str(e), db=db)
                ctx.event(f"job {ctx.job_id} ({spec.kind}) cancelled", level="warning")
        except FerrymanError as e:
            stop_persist.set()
            self._finish(ctx.job_id, "failed", error=str(e), db=db)
            ctx.event(f"job {ctx.job_id} ({spec.kind}) failed: {e}", level="error", code=e.code)
        except Exception as e:  # a bug: keep the daemon alive, keep the traceback in the log
            stop_persist.set()
            log.error("job %s crashed:\n%s", ctx.job_id, traceback.format_exc())
            self._finish(
                ctx.job_id,
                "failed",
                error=f"internal error: {e!r} (see the daemon "
                "log; ferryman support-bundle collects it)",
                db=db,
            )
            ctx.event(
                f"job {ctx.job_id} ({spec.kind}) failed with an internal error", level="error"
            )
        finally:
            with self._lock:
                self._running.pop(ctx.job_id, None)
            db.close()

    def _persist_progress(self, ctx: JobContext, stop: threading.Event) -> None:
        db = self._db_factory()
        try:
            while not stop.wait(PROGRESS_PERSIST_S):
                db.execute(
                    "UPDATE jobs SET progress=? WHERE id=? AND state='running'",
                    [dumps(ctx.progress.snapshot()), ctx.job_id],
                )
        finally:
            db.close()

    def _finish(
        self,
        job_id: int,
        state: str,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        db: Database | None = None,
        progress: dict[str, Any] | None = None,
    ) -> None:
        if db is None:
            with self._dblock:
                self._finish(
                    job_id, state, result=result, error=error, db=self._db, progress=progress
                )
            return
        db.execute(
            "UPDATE jobs SET state=?, result=?, error=?, ended_at=?, "
            "progress=COALESCE(?, progress) WHERE id=?",
            [
                state,
                dumps(result) if result is not None else None,
                error,
                now(),
                dumps(progress) if progress is not None else None,
                job_id,
            ],
        )
