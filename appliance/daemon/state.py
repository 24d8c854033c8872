"""What the API handlers share: the store, the job runner, the probe verdict."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance.daemon.jobs import JobRunner
from appliance.errors import NotFound
from store.db import now, schema_version
from store.records import audit, events, get_setting


class DaemonState:
    def __init__(
        self, db_path: Path, db_factory: Callable[[], Database], runner: JobRunner
    ) -> None:
        self.db_path = db_path
        self.db_factory = db_factory
        self.runner = runner
        self.pid = os.getpid()
        self.started_at = now()
        self._local = threading.local()
        self.schema = schema_version(self.db)

    @property
    def db(self) -> Database:
        """One connection per thread (API handlers run in a thread pool)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self.db_factory()
        return db

    def machine_id(self, machine: str) -> int:
        row = self.db.execute(
            "SELECT id FROM machines WHERE name = ? OR CAST(id AS TEXT) = ?", [machine, machine]
        ).fetchone()
        if row is None:
            raise NotFound(f"no machine '{machine}'", hint="list machines with: ferryman machines")
        return int(row[0])

    def probe_verdict(self) -> dict[str, Any] | None:
        v: dict[str, Any] | None = get_setting(self.db, "probe")
        return v

    def events(self, **kw: Any) -> list[dict[str, Any]]:
        return events(self.db, **kw)

    def audit(
        self, who: str, origin: str, action: str, params: dict[str, Any], result: str
    ) -> None:
        audit(self.db, who, origin, action, params, result)
