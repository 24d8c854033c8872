"""A real NBD source for engine tests: a raw file served read-only by qemu-nbd, and the CLI
steps that register, protect and sync it through a real ferrymand."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.units import MiB
from tests.helpers.daemon import Env, run_cli


def write_random(img: Path, offset: int, length: int, seed: int) -> None:
    data = (seed.to_bytes(4, "little") * (length // 4 + 1))[:length]
    rnd = os.urandom(length // 2) + data[: length - length // 2]
    with open(img, "r+b") as f:
        f.seek(offset)
        f.write(rnd)


class Export:
    """qemu-nbd serving a raw file read-only on a unix socket; stopped by PID."""

    def __init__(self, img: Path, sock: Path, fmt: str = "raw", bitmap: str | None = None) -> None:
        self.img, self.sock, self.fmt, self.bitmap = img, sock, fmt, bitmap
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.sock.unlink(missing_ok=True)
        extra = [f"--bitmap={self.bitmap}"] if self.bitmap else []
        self.proc = subprocess.Popen(
            ["qemu-nbd", "-f", self.fmt, "-r", "-t", "-k", str(self.sock), *extra, str(self.img)]
        )
        for _ in range(100):
            if self.sock.exists():
                return
            time.sleep(0.05)
        raise RuntimeError("qemu-nbd did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"


@pytest.fixture
def source(tmp_path: Path) -> Iterator[Export]:
    img = tmp_path / "source.raw"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    for i, off in enumerate((0, 5 * MiB, 20 * MiB, 47 * MiB)):
        write_random(img, off, 3 * MiB + 12345, i)
    exp = Export(img, tmp_path / "src.sock")
    exp.start()
    yield exp
    exp.stop()


def cli(env: Env, *args: str) -> dict:  # type: ignore[type-arg]
    r = run_cli(env, *args, "--json", timeout=300)
    assert r.returncode == 0, f"{args}: {r.stdout} {r.stderr}"
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def point_path(env: Env, machine: str) -> tuple[Path, dict]:  # type: ignore[type-arg]
    rps = cli(env, "points", machine)
    rp = rps[-1]
    return Path(rp["disks"][0]["path"]), rp


def assert_equal(src: Path, point: Path, fmt: str = "raw") -> None:
    r = subprocess.run(
        ["qemu-img", "compare", "-U", "-f", fmt, "-F", "qcow2", str(src), str(point)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    c = subprocess.run(["qemu-img", "check", str(point)], capture_output=True, text=True)
    assert c.returncode in (0, 3), c.stdout + c.stderr


def register(env: Env, exp: Export, *extra: str) -> None:
    cli(
        env,
        "source",
        "add",
        "lab",
        "--kind",
        "nbd",
        "--uri",
        exp.uri,
        "--param",
        "name=web01",
        *extra,
    )
    job = cli(env, "discover", "lab", "--wait")
    assert job["result"]["machines"] == 1
    cli(env, "protect", "web01")  # no RPO target: syncs only when asked
