"""Block-hash manifests: sha256 per block of a disk, read over NBD.

Used three ways:
- verify: hash the source snapshot and the new restore point, both over NBD, and compare;
- "compare" incremental mode of NBD sources without a dirty bitmap: the copier hashes each
  block it reads and writes only those whose hash differs from the previous point's manifest;
- periodic full compare that catches changes the tracking missed (reliability row 18).

Blocks that block status reports as zero are not read: their hash is the hash of zeroes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbd

from appliance.datapath import extents as ex
from appliance.datapath.copier import ProgressSink, connect
from appliance.datapath.errors import SourceReadError, SourceUnavailable, VerifyMismatch
from appliance.errors import Cancelled
from appliance.units import MiB

BLOCK_SIZE = 1 * MiB  # 16 GiB -> 16384 hashes (512 KiB): fine grained, small manifest
ALGO = "sha256"
HASH_IN_FLIGHT = 8


def _zero_hash(n: int, cache: dict[int, bytes] = {}) -> bytes:  # noqa: B006 - memo
    if n not in cache:
        cache[n] = hashlib.sha256(bytes(n)).digest()
    return cache[n]


@dataclass
class HashManifest:
    size: int
    block_size: int = BLOCK_SIZE
    algo: str = ALGO
    hashes: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.hashes:
            self.hashes = [b""] * self.blocks

    @property
    def blocks(self) -> int:
        return (self.size + self.block_size - 1) // self.block_size

    def block_len(self, i: int) -> int:
        return min(self.block_size, self.size - i * self.block_size)

    def complete(self) -> bool:
        return all(self.hashes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "block_size": self.block_size,
            "algo": self.algo,
            "hashes": base64.b64encode(b"".join(self.hashes)).decode(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HashManifest:
        raw = base64.b64decode(d["hashes"])
        hashes = [raw[i : i + 32] for i in range(0, len(raw), 32)]
        return cls(size=d["size"], block_size=d["block_size"], algo=d["algo"], hashes=hashes)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> HashManifest:
        return cls.from_dict(json.loads(path.read_text()))

    def digest(self) -> str:
        """One hash over the manifest: a compact token field."""
        return hashlib.sha256(b"".join(self.hashes)).hexdigest()

    def diff(self, other: HashManifest) -> list[int]:
        """Offsets of blocks that differ."""
        if (self.size, self.block_size, self.algo) != (other.size, other.block_size, other.algo):
            raise VerifyMismatch(
                f"manifests are not comparable: size/block {self.size}/{self.block_size} vs "
                f"{other.size}/{other.block_size}",
                hint="run a full verify",
            )
        return [
            i * self.block_size
            for i, (a, b) in enumerate(zip(self.hashes, other.hashes, strict=True))
            if a != b
        ]


class ManifestBuilder:
    """The copier's BlockHasher: records each block's hash while copying; in compare mode
    (``previous`` given) tells the copier which blocks are unchanged."""

    def __init__(
        self,
        size: int,
        block_size: int = BLOCK_SIZE,
        previous: HashManifest | None = None,
        compare: bool = True,
    ) -> None:
        self.block_size = block_size
        self.manifest = HashManifest(size=size, block_size=block_size)
        self.previous = previous
        self.compare = compare
        if previous is not None:
            if (previous.size, previous.block_size) != (size, block_size):
                raise ValueError("previous manifest has another size or block size")
            # Blocks this sync does not touch keep the previous point's hash.
            self.manifest.hashes = list(previous.hashes)

    def unchanged(self, offset: int, data: bytes) -> bool:
        i = offset // self.block_size
        h = hashlib.sha256(data).digest()
        self.manifest.hashes[i] = h
        return bool(self.compare and self.previous is not None and self.previous.hashes[i] == h)

    def zero(self, offset: int, length: int) -> None:
        first = offset // self.block_size
        last = (offset + length - 1) // self.block_size
        for i in range(first, last + 1):
            self.manifest.hashes[i] = _zero_hash(self.manifest.block_len(i))


def hash_export(
    uri: str,
    *,
    disk: str = "disk",
    block_size: int = BLOCK_SIZE,
    progress: ProgressSink | None = None,
    cancel: threading.Event | None = None,
    max_in_flight: int = HASH_IN_FLIGHT,
    clock: Callable[[], float] = time.monotonic,
) -> HashManifest:
    """Hash every block of an NBD export. Zero blocks (per block status) are not read."""
    try:
        h = connect(uri, name=f"hash-{disk}", contexts=[ex.BASE_ALLOCATION])
    except nbd.Error as e:
        raise SourceUnavailable(disk, 0, f"cannot connect to {uri}: {e.string}") from e
    size = h.get_size()
    mx = h.get_block_size(nbd.SIZE_MAXIMUM) or ex.DEFAULT_MAX_REQUEST
    if block_size > mx:
        block_size = mx
    man = HashManifest(size=size, block_size=block_size)
    exts, _ = ex.query_extents(h, size)
    zero_blocks = _zero_blocks(exts, block_size, size)
    todo = [i for i in range(man.blocks) if i not in zero_blocks]
    for i in zero_blocks:
        man.hashes[i] = _zero_hash(man.block_len(i))
    if progress is not None:
        progress.set_total(size)
        progress.update(sum(man.block_len(i) for i in zero_blocks))
    pending = list(reversed(todo))
    done: list[tuple[int, Any, int]] = []
    inflight = 0
    pool: list[Any] = []
    while pending or inflight or done:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"disk {disk}: hashing cancelled")
        while pending and inflight < max_in_flight:
            i = pending.pop()
            n = man.block_len(i)
            buf = pool.pop() if pool and n == block_size else nbd.Buffer(n)

            def cb(err: Any, i: int = i, buf: Any = buf) -> int:
                done.append((i, buf, int(err.value)))
                return 1

            h.aio_pread(buf, i * block_size, cb)
            inflight += 1
        if not done:
            h.poll(-1)
        for i, buf, err in done:
            inflight -= 1
            if err:
                raise SourceReadError(
                    disk, i * block_size, err, attempts=1, detail="while hashing for verification"
                )
            man.hashes[i] = hashlib.sha256(buf.to_bytearray()).digest()
            if progress is not None:
                progress.update(man.block_len(i))
            if buf.size() == block_size:
                pool.append(buf)
        done.clear()
    return man


def _zero_blocks(exts: list[Any], block_size: int, size: int) -> set[int]:
    """Blocks entirely covered by zero extents."""
    out: set[int] = set()
    for e in exts:
        if e.zero:
            first = -(-e.offset // block_size)
            last_excl = -(-e.end // block_size) if e.end >= size else e.end // block_size
            out.update(range(first, last_excl))
    return out


@dataclass
class VerifyResult:
    ok: bool
    blocks: int
    mismatches: list[int]  # offsets
    source: HashManifest
    target: HashManifest
    elapsed_s: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "blocks": self.blocks,
            "mismatches": self.mismatches[:100],
            "mismatch_count": len(self.mismatches),
            "elapsed_s": self.elapsed_s,
            "source_digest": self.source.digest(),
            "target_digest": self.target.digest(),
        }


def verify(
    source_uri: str,
    target_uri: str,
    *,
    disk: str = "disk",
    block_size: int = BLOCK_SIZE,
    cancel: threading.Event | None = None,
    raise_on_mismatch: bool = True,
) -> VerifyResult:
    """Hash both exports and compare block by block."""
    t0 = time.monotonic()
    a = hash_export(source_uri, disk=disk, block_size=block_size, cancel=cancel)
    b = hash_export(target_uri, disk=disk, block_size=a.block_size, cancel=cancel)
    if a.size != b.size:
        raise VerifyMismatch(
            f"disk {disk}: the source is {a.size} bytes, the restore point {b.size}",
            hint="resync the disk",
        )
    bad = a.diff(b)
    res = VerifyResult(
        ok=not bad,
        blocks=a.blocks,
        mismatches=bad,
        source=a,
        target=b,
        elapsed_s=time.monotonic() - t0,
    )
    if bad and raise_on_mismatch:
        raise VerifyMismatch(
            f"disk {disk}: {len(bad)} of {a.blocks} blocks differ between the source snapshot "
            f"and the restore point (first at offset {bad[0]})",
            hint="the restore point is not trusted: run a full resync (ferryman sync --full)",
        )
    return res
