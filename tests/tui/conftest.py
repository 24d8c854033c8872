"""TUI fixtures: a real ferrymand on a temporary store, seeded at a fixed instant, and the App
built with injected services (socket, store, clock) as harlequin's functional tests do.

The daemon runs with a one-day scheduler tick: the RPO scheduler would otherwise start syncs
of the seeded machines with the real clock, which a snapshot cannot hold still. Tests that
want the scheduler do not use these fixtures.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import Env, running_daemon
from tests.tui.seed import fixed_clock, normalise_daemon_rows, seed
from tui.app import FerrymanApp
from tui.services import Services

QUIET = ("--no-probe", "--scheduler-tick", "86400")


def make_app(env: Env, *, refresh_s: float = 0.0) -> FerrymanApp:
    return FerrymanApp(
        Services(
            socket_path=env.socket,
            db_path=env.db,
            clock=fixed_clock,
            refresh_s=refresh_s,
            user="test",
        )
    )


@contextlib.contextmanager
def seeded(root: Path, *, running_sync: bool = True) -> Iterator[Env]:
    env = Env(root)
    with running_daemon(env, *QUIET):
        seed(env.db, running_sync=running_sync)
        normalise_daemon_rows(env.db)
        yield env


@pytest.fixture
def scene(fm_env: Env) -> Iterator[Env]:
    """A seeded daemon for one test (tests that change state)."""
    with running_daemon(fm_env, *QUIET) as daemon:
        seed(fm_env.db)
        normalise_daemon_rows(fm_env.db)
        fm_env.daemon = daemon  # type: ignore[attr-defined]
        yield fm_env


@pytest.fixture(scope="module")
def shared_scene() -> Iterator[Env]:
    """A seeded daemon shared by the read-only tests of a module (snapshots)."""
    with tempfile.TemporaryDirectory(prefix="fm-tui-") as d, seeded(Path(d)) as env:
        yield env


@pytest.fixture
def app_for() -> Callable[..., FerrymanApp]:
    return make_app
