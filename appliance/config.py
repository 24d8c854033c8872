"""Where Ferryman keeps things. One place, so the daemon, CLI, TUI and tests agree.

Every path can be moved with an environment variable (tests point them at a temporary
directory); the defaults are those of the appliance.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Paths:
    state_dir: Path  # state.db, keys
    volume_dir: Path  # restore-point chains, overlays (the volume store)
    run_dir: Path  # API socket, daemon lock, backup sockets (libvirt-qemu must write here)
    log_dir: Path
    cache_dir: Path  # built images (outside the clone)

    @property
    def db(self) -> Path:
        return Path(os.environ.get("FERRYMAN_DB", str(self.state_dir / "state.db")))

    @property
    def socket(self) -> Path:
        return Path(os.environ.get("FERRYMAN_SOCKET", str(self.run_dir / "ferrymand.sock")))

    @property
    def lock(self) -> Path:
        # Beside the store: a second daemon on the same store must refuse, whatever socket.
        return self.db.with_name(self.db.name + ".lock")


def paths() -> Paths:
    env = os.environ.get
    state = Path(env("FERRYMAN_STATE_DIR", "/var/lib/ferryman"))
    return Paths(
        state_dir=state,
        volume_dir=Path(env("FERRYMAN_VOLUME_DIR", str(state / "volumes"))),
        run_dir=Path(env("FERRYMAN_RUN_DIR", "/run/ferryman")),
        log_dir=Path(env("FERRYMAN_LOG_DIR", "/var/log/ferryman")),
        cache_dir=Path(env("FERRYMAN_CACHE", "/var/cache/ferryman")),
    )


def environment_under(base: Path) -> dict[str, str]:
    """Environment variables that put an appliance's state, socket, logs, volumes and demo lab
    under ``base``: a second, independent Ferryman on the same host (the demo test and the
    demo benchmark run ``scripts/demo`` this way). The image cache stays shared."""
    return {
        "FERRYMAN_STATE_DIR": str(base / "state"),
        "FERRYMAN_RUN_DIR": str(base / "run"),
        "FERRYMAN_SOCKET": str(base / "run" / "ferrymand.sock"),
        "FERRYMAN_LOG_DIR": str(base / "log"),
        "FERRYMAN_VOLUME_DIR": str(base / "volumes"),
        "FERRYMAN_LAB_DIR": str(base / "lab"),
    }
