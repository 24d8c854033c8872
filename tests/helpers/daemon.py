"""Start a real ferrymand on a temporary store, stop it by PID (never anything else)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.client import Client

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@dataclass
class Env:
    root: Path

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "ferrymand.sock"

    @property
    def db(self) -> Path:
        return self.state_dir / "state.db"

    @property
    def log(self) -> Path:
        return self.root / "ferrymand.log"

    def vars(self) -> dict[str, str]:
        return {
            "FERRYMAN_STATE_DIR": str(self.state_dir),
            "FERRYMAN_SOCKET": str(self.socket),
            "FERRYMAN_RUN_DIR": str(self.root / "run"),
            "FERRYMAN_VOLUME_DIR": str(self.root / "volumes"),
            "FERRYMAN_LOG_DIR": str(self.root / "log"),
        }

    def environ(self) -> dict[str, str]:
        return {**os.environ, **self.vars()}

    def client(self) -> Client:
        return Client(self.socket, user="test")


@contextmanager
def scratch_env(prefix: str) -> Iterator[Env]:
    """A throw-away Env the process environment points at (benchmarks), restored after."""
    import tempfile

    base = Path(os.environ.get("FERRYMAN_TEST_SCRATCH", "/var/tmp"))
    with tempfile.TemporaryDirectory(prefix=prefix, dir=base) as tmp:
        env = Env(Path(tmp))
        saved = {k: os.environ.get(k) for k in env.vars()}
        os.environ.update(env.vars())
        try:
            yield env
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def run_cli(env: Env, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "ferryman"), *args],
        env=env.environ(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Daemon:
    def __init__(self, env: Env, *extra: str) -> None:
        self.env = env
        self.proc = subprocess.Popen(
            [str(BIN / "ferrymand"), "--log-file", str(env.log), *extra],
            env=env.environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ferrymand exited {self.proc.returncode}: "
                    f"{self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            if self.env.socket.exists():
                try:
                    with self.env.client() as c:
                        c.health()
                    return
                except Exception:
                    pass
            time.sleep(0.1)
        raise TimeoutError(f"ferrymand did not answer within {timeout} s")

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@contextmanager
def running_daemon(env: Env, *extra: str) -> Iterator[Daemon]:
    d = Daemon(env, *extra)
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()
