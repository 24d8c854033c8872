"""What the screens talk to, injected into the App so tests and benchmarks choose the daemon,
the store and the clock.

Actions go through appliance.client only (the one client library). Displays may read the
store read-only (WAL: never blocks the daemon). Both are blocking: call them from thread
workers only. One store connection per thread (sqlite3 objects are not shared across
threads); one client for all (see Services.client).

Plans, test runs and cutover come from the daemon's plan API (issue 6). The store is read
only for the sparklines' sync history, which an operator account may not be allowed to read.
"""

from __future__ import annotations

import logging
import socket
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from appliance.config import paths
from appliance.errors import FerrymanError
from store.db import open_readonly

if TYPE_CHECKING:
    from sqlite_utils import Database

    from appliance.client import Client

log = logging.getLogger(__name__)

REFRESH_S = 1.0  # dashboard and job views poll the daemon this often
REACH_TIMEOUT_S = 3.0  # a host that does not answer in 3 s is reported as unreachable
DEFAULT_PORTS = {
    "nbd": 10809,
    "nbds": 10809,
    "https": 443,
    "ssh": 22,
    "qemu+ssh": 22,
    "qemu+tls": 16514,
    "qemu+tcp": 16509,
}


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Services:
    socket_path: Path | None = None
    db_path: Path | None = None
    clock: Callable[[], datetime] = _utcnow
    refresh_s: float = REFRESH_S
    user: str | None = None
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _client: Client | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.db_path = self.db_path or paths().db
        self.socket_path = self.socket_path or paths().socket

    @property
    def client(self) -> Client:
        """One client for every worker thread. Textual starts a new thread per worker, and
        building a client costs ~30-180 ms of CPU (httpx loads the CA bundle into an SSL
        context, holding the GIL): one per refresh was the TUI's main source of loop lag.
        httpx's connection pool is thread-safe."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    # Imported here, in the first worker: httpx (~60 ms of CPU) loads while
                    # the event loop composes and paints the first screen.
                    from appliance.client import Client

                    self._client = Client(self.socket_path, user=self.user)
        return self._client

    @contextmanager
    def store(self) -> Iterator[Database]:
        """A read-only connection for this call only (worker threads are not reused)."""
        assert self.db_path is not None
        db = open_readonly(self.db_path)
        try:
            yield db
        finally:
            db.conn.close()

    def now(self) -> datetime:
        return self.clock()

    # -- display reads from the store ----------------------------------------------------

    def throughput_history(self, limit_per_machine: int = 12) -> dict[int, list[float]]:
        """Mean bytes/s of each machine's last sealed syncs, oldest first.

        Only decoration for the dashboard: an operator account that may not read the store
        (it is root's) still gets the dashboard, without sparklines of past syncs."""
        try:
            return self._throughput_history(limit_per_machine)
        except (FerrymanError, sqlite3.Error, OSError) as e:
            if not getattr(self, "_history_warned", False):
                log.warning("no sync history for the sparklines: %s", e)
                self._history_warned = True
            return {}

    def _throughput_history(self, limit_per_machine: int) -> dict[int, list[float]]:
        with self.store() as db:
            rows = self._history_rows(db, limit_per_machine)
        out: dict[int, list[float]] = {}
        for mid, nbytes, start, end in rows:
            secs = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
            out.setdefault(mid, []).append(nbytes / secs if secs > 0 else 0.0)
        return out

    @staticmethod
    def _history_rows(db: Database, limit_per_machine: int) -> list[Any]:
        return db.execute(
            "SELECT machine_id, bytes_read, started_at, ended_at FROM ("
            " SELECT *, row_number() OVER (PARTITION BY machine_id ORDER BY id DESC) AS n"
            " FROM sync_sessions WHERE state='sealed' AND ended_at IS NOT NULL)"
            " WHERE n <= ? ORDER BY machine_id, id",
            [limit_per_machine],
        ).fetchall()

    # -- plans, test runs, cutover: through the client (issue 6's API) -------------------

    def plans(self) -> list[dict[str, Any]]:
        return self.client.plans()

    def plan_versions(self, name: str, latest: int) -> list[dict[str, Any]]:
        """The latest version and the one before it (for the diff), oldest first."""
        wanted = [v for v in (latest - 1, latest) if v >= 1]
        return [self.client.plan(name, v) for v in wanted]

    def plan_runs(self, kind: str) -> list[dict[str, Any]]:
        runs = self.client.test_runs() if kind == "test" else self.client.cutovers()
        return sorted(runs, key=lambda r: -int(r["id"]))

    def save_plan(self, name: str, document: dict[str, Any]) -> dict[str, Any]:
        return self.client.save_plan(name, document)

    def start_test_run(self, plan: str) -> dict[str, Any]:
        return self.client.test_run(plan)

    def cutover_start(self, plan: str) -> dict[str, Any]:
        return self.client.cutover_start(plan)

    def cutover_confirm(self, run_id: int, step: str) -> dict[str, Any]:
        return self.client.cutover_confirm(run_id, step)

    def cutover_rollback(self, run_id: int) -> dict[str, Any]:
        return self.client.cutover_rollback_run(run_id)


# -- local pre-checks, so that a typo never reaches the daemon --------------------------------


def reachability(uri: str, timeout: float = REACH_TIMEOUT_S) -> str | None:
    """None when the address answers; otherwise what is wrong, in words for the field."""
    u = urlsplit(uri)
    if u.scheme.endswith("+unix") or u.scheme == "qemu" or u.scheme == "nbd+vsock":
        sock = (parse_qs(u.query).get("socket") or [None])[0]
        if u.scheme == "qemu" or u.scheme == "nbd+vsock":
            return None  # local libvirt or vsock: the daemon's test tells
        if not sock:
            return "a unix address needs ?socket=/path/to/socket"
        if not Path(sock).exists():
            return f"no socket at {sock}: is the server running?"
        return None
    host = u.hostname
    if not host:
        return "no host name in the address"
    try:
        port = u.port or DEFAULT_PORTS.get(u.scheme, 0)
    except ValueError:
        return "the port must be a number from 1 to 65535"
    if not port:
        return "give a port: HOST:PORT"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return f"host '{host}' is not known: check the name or use its IP address"
    last = ""
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.settimeout(timeout)
            try:
                s.connect(addr)
                return None
            except TimeoutError:
                last = f"{host}:{port} does not answer within {timeout:.0f} s (firewall?)"
            except OSError as e:
                last = f"{host}:{port} is unreachable: {e.strerror or e}"
    return last or f"{host}:{port} is unreachable"
