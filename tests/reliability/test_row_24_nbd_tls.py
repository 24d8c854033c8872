"""Row 24: NBD over the network uses TLS in require mode. A wrong PSK and a server without
TLS are refused; clear text over TCP is refused at registration unless asked for."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.errors import FerrymanError
from appliance.sources.nbd import NbdSource
from appliance.units import MiB
from tests.helpers.daemon import Daemon, Env, run_cli
from tests.helpers.nbdsrc import assert_equal, cli

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def psk(path: Path, user: str = "ferryman") -> Path:
    subprocess.run(["psktool", "-u", user, "-p", str(path)], check=True, capture_output=True)
    path.chmod(0o600)
    return path


class Server:
    def __init__(self, image: Path, port: int, keys: Path | None) -> None:
        tls = ["--tls=require", f"--tls-psk={keys}"] if keys else ["--tls=off"]
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), *tls, "file", str(image)],
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("nbdkit did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    img = tmp_path / "disk.raw"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
        f.seek(3 * MiB)
        f.write(bytes(range(256)) * 8192)
    return img


@pytest.fixture
def tls_server(image: Path, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    keys = psk(tmp_path / "server.psk")
    port = free_port()
    s = Server(image, port, keys)
    yield port, keys
    s.stop()


def uri(port: int, keys: Path) -> str:
    return f"nbds://ferryman@127.0.0.1:{port}/?tls-psk-file={keys}"


def test_row_24_right_key_reads(tls_server: tuple[int, Path]) -> None:
    port, keys = tls_server
    NbdSource({"uri": uri(port, keys)}).test()


def test_row_24_wrong_key_refused(tls_server: tuple[int, Path], tmp_path: Path) -> None:
    port, _ = tls_server
    wrong = psk(tmp_path / "wrong.psk")
    with pytest.raises(FerrymanError, match="cannot open NBD export"):
        NbdSource({"uri": uri(port, wrong)}).test()


def test_row_24_server_without_tls_refused(image: Path, tmp_path: Path) -> None:
    keys = psk(tmp_path / "k.psk")
    port = free_port()
    plain = Server(image, port, None)
    try:
        with pytest.raises(FerrymanError, match="cannot open NBD export"):
            NbdSource({"uri": uri(port, keys)}).test()  # nbds:// = TLS required
    finally:
        plain.stop()


def test_row_24_through_the_daemon(
    daemon: Daemon, fm_env: Env, image: Path, tls_server: tuple[int, Path]
) -> None:
    port, keys = tls_server
    r = run_cli(
        fm_env,
        "source",
        "add",
        "plain",
        "--kind",
        "nbd",
        "--uri",
        f"nbd://127.0.0.1:{port}/",
        "--no-test",
    )
    assert r.returncode == 1 and "without TLS" in r.stderr and "nbds://" in r.stderr
    cli(
        fm_env,
        "source",
        "add",
        "lab",
        "--kind",
        "nbd",
        "--uri",
        uri(port, keys),
        "--param",
        "name=files01",
    )
    cli(fm_env, "discover", "lab", "--wait")
    cli(fm_env, "protect", "files01")
    job = cli(fm_env, "sync", "files01", "--wait")
    assert job["state"] == "succeeded"
    point = Path(cli(fm_env, "points", "files01")[-1]["disks"][0]["path"])
    assert_equal(image, point)
