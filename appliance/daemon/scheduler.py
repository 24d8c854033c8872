"""Continuous protection: start syncs so each protected machine meets its RPO target.

A sync starts when the newest restore point is half as old as the RPO target, leaving the
other half for the sync itself. After a failure the next try backs off (30 s, 60 s, ...,
capped at half the RPO) so a broken source is not hammered; the third consecutive failure
raises an alert event. The scheduler never queues behind a running job: it tries again at
the next tick.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from sqlite_utils import Database

from appliance import inventory
from appliance.daemon.jobs import JobRunner
from appliance.errors import FerrymanError
from store.records import add_event

log = logging.getLogger(__name__)

TICK_S = 10.0
START_FRACTION = 0.5  # start a sync when the newest point is this old, relative to the RPO
BACKOFF_FIRST_S = 30.0


def _age(ts: str | None) -> float | None:
    if not ts:
        return None
    return (datetime.now(UTC) - datetime.fromisoformat(ts)).total_seconds()


class Scheduler:
    def __init__(
        self, db_factory: Callable[[], Database], runner: JobRunner, tick_s: float = TICK_S
    ) -> None:
        self._db_factory = db_factory
        self._runner = runner
        self._tick = tick_s
        self._stop = threading.Event()
        self._alerted: dict[int, int] = {}
        self._thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        db = self._db_factory()
        try:
            while not self._stop.wait(self._tick):
                try:
                    self.tick(db)
                except Exception:
                    log.exception("scheduler tick failed")
        finally:
            db.close()

    def tick(self, db: Database) -> list[int]:
        """One pass; returns the machine ids it started syncs for."""
        started = []
        for m in inventory.machines_overview(db):
            if not m["protected"] or not m["rpo_seconds"] or m["cutover_done"]:
                continue
            if m["active_job"]:
                continue
            rpo = float(m["rpo_seconds"])
            fails = m["failed_syncs"]
            if fails >= inventory.FAILED_SYNC_ALERT and self._alerted.get(m["id"]) != fails:
                self._alerted[m["id"]] = fails
                add_event(
                    db,
                    f"{m['name']}: {fails} syncs in a row failed; RPO target "
                    f"{int(rpo)} s is at risk (see: ferryman machine show {m['name']})",
                    level="error",
                    kind="alert",
                    machine_id=m["id"],
                )
            if fails:
                row = db.execute(
                    "SELECT ended_at FROM jobs WHERE machine_id=? AND kind='sync' "
                    "ORDER BY id DESC LIMIT 1",
                    [m["id"]],
                ).fetchone()
                wait = min(rpo * START_FRACTION, BACKOFF_FIRST_S * 2 ** (fails - 1))
                since = _age(row[0]) if row else None
                if since is not None and since < wait:
                    continue
            newest = m["newest_rp"]
            if newest is not None and newest["age_s"] < rpo * START_FRACTION:
                continue
            try:
                self._runner.submit(
                    "sync",
                    machine_id=m["id"],
                    who="scheduler",
                    origin="rpo",
                    params={"reason": "rpo"},
                )
                started.append(m["id"])
            except FerrymanError as e:  # an operator's job got there first
                log.info("scheduler: %s: %s", m["name"], e)
        self.boot_verify(db)
        return started

    def boot_verify(self, db: Database) -> None:
        """Boot verifications that are due (appliance/bootverify.py); never stops a tick."""
        from appliance import bootverify

        try:
            bootverify.tick(db, self._runner)
        except FerrymanError as e:
            log.info("scheduler: boot verification: %s", e)
