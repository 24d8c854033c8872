"""Shared fixtures. Subsystem fixture modules are registered as plugins below."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.daemon import Daemon, Env, running_daemon

os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")

pytest_plugins = [
    "tests.images_fixtures",
    "tests.datapath_fixtures",
    "tests.vsphere_fixtures",
    "tests.agent_fixtures",
]


@pytest.fixture
def fm_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    """A private state dir, socket and volume store; the process env points at them."""
    env = Env(tmp_path)
    for k, v in env.vars().items():
        monkeypatch.setenv(k, v)
    return env


@pytest.fixture
def daemon(fm_env: Env) -> Iterator[Daemon]:
    """A real ferrymand (no start-up probe: tests that need one ask for it)."""
    with running_daemon(fm_env, "--no-probe") as d:
        yield d
