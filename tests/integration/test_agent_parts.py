"""linux-agent parts that need no server guest: the helper's NBD servers and hashes run here
on a local file, against real libnbd, nbdkit, qemu-nbd and ssh-keygen."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import nbd
import pytest

from appliance.datapath.hashing import BLOCK_SIZE, HashManifest, _zero_hash, hash_export
from appliance.sources.agent.errors import AgentError
from appliance.sources.agent.source import extents_from_hashes
from appliance.sources.agent.ssh import HostKey
from appliance.sources.base import Extent
from appliance.units import MiB

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HELPER = Path(__file__).resolve().parents[2] / "appliance" / "sources" / "agent" / "helper.py"


@pytest.fixture
def image(tmp_path: Path) -> Path:
    """8 MiB + 1.5 KiB (block devices come in 512-byte sectors): data, a zero hole, data,
    a short last block."""
    p = tmp_path / "disk.raw"
    with open(p, "wb") as f:
        f.write(os.urandom(3 * MiB + 5))
        f.seek(6 * MiB)
        f.write(os.urandom(2 * MiB + 1536))
    return p


def helper_hashes(dev: Path) -> tuple[int, list[bytes]]:
    out = subprocess.run(
        [sys.executable, str(HELPER), "hash", str(dev), str(BLOCK_SIZE)],
        capture_output=True,
        check=True,
    ).stdout
    size = int.from_bytes(out[:8], "big")
    return size, [out[8 + i : 8 + i + 32] for i in range(0, len(out) - 8, 32)]


@pytest.mark.parametrize("server", ["builtin", "nbdkit", "qemu-nbd"])
def test_helper_serves_nbd_on_stdio(image: Path, server: str) -> None:
    data = image.read_bytes()
    h = nbd.NBD()
    h.connect_command([sys.executable, str(HELPER), "serve", str(image), server])
    assert h.get_size() == len(data)
    assert h.is_read_only()
    for off, n in ((0, MiB), (3 * MiB, MiB), (len(data) - 1536, 1536), (5, 4096)):
        assert h.pread(n, off) == data[off : off + n]
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 512, 0)
    h.shutdown()


def test_helper_hashes_equal_the_engines_manifest(image: Path, tmp_path: Path) -> None:
    """The server-side manifest must be the one the engine computes over NBD (verify and
    compare use it): same block size, algorithm, short last block and zero-block hashes."""
    size, hashes = helper_hashes(image)
    ours = HashManifest(size=size, block_size=BLOCK_SIZE, hashes=hashes)
    sock = tmp_path / "s"
    p = subprocess.Popen(["qemu-nbd", "-r", "-f", "raw", "-k", str(sock), str(image)])
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        engine = hash_export(f"nbd+unix:///?socket={sock}")
    finally:
        p.terminate()
        p.wait(10)
    assert ours.size == engine.size and ours.blocks == 9
    assert ours.diff(engine) == []
    assert ours.digest() == engine.digest()
    assert ours.hashes[4] == _zero_hash(MiB)  # the hole


def test_extents_from_hashes(image: Path) -> None:
    size, hashes = helper_hashes(image)
    full = extents_from_hashes(hashes, size, BLOCK_SIZE, None)
    assert full == [
        Extent(0, 4 * MiB, False),  # 3 MiB + 5 bytes of data touch 4 blocks
        Extent(4 * MiB, 2 * MiB, True),
        Extent(6 * MiB, size - 6 * MiB, False),
    ]
    prev = HashManifest(size=size, block_size=BLOCK_SIZE, hashes=list(hashes))
    changed = list(hashes)
    changed[1] = hashlib.sha256(b"other").digest()
    changed[2] = hashlib.sha256(b"other2").digest()
    changed[5] = _zero_hash(MiB)
    assert extents_from_hashes(changed, size, BLOCK_SIZE, prev) == [Extent(MiB, 2 * MiB, False)]
    changed[8] = _zero_hash(size - 8 * MiB)
    assert extents_from_hashes(changed, size, BLOCK_SIZE, prev) == [
        Extent(MiB, 2 * MiB, False),
        Extent(8 * MiB, size - 8 * MiB, True),
    ]


def test_host_key_fingerprint_matches_ssh_keygen(tmp_path: Path) -> None:
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    line = (tmp_path / "k.pub").read_text()
    want = subprocess.run(
        ["ssh-keygen", "-lf", str(tmp_path / "k.pub")], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    hk = HostKey.parse("[127.0.0.1]:2222 " + line)
    assert hk.fingerprint == want
    assert hk.type == "ssh-ed25519" and hk.algorithms == "ssh-ed25519"
    with pytest.raises(AgentError):
        HostKey.parse("not a key at all")


def test_helper_runs_on_python36_syntax() -> None:
    """The helper must parse as Python 3.6 (old servers): ast with feature_version."""
    import ast

    ast.parse(HELPER.read_text(), feature_version=(3, 6))
