"""Seeding over removable media: the first full copy travels in a box, deltas over the link.

    site A (source side)                               site B (target side)
    ferryman seed export web01 --to /mnt/usb ...       ferryman seed import /mnt/usb ...
      restore point (chain flattened, read over NBD)     every chunk: sha256, AES-GCM, blocks
      -> 64 MiB chunks, zero chunks only listed          -> a new chain base rpNNNNNN.qcow2
      -> AES-256-GCM per chunk, bound to its place       -> restore point + commit token
      -> manifest (encrypted) + SHA256SUMS               -> next sync: incremental

The seed directory:

    seed.json      clear header: format, seed id, machine name, point, disks, key check,
                   state (exporting | complete); what ``ferryman seed show`` prints
    journal.jsonl  one encrypted record per finished chunk (what a resumed export skips)
    <disk>/NNNNNN.chunk   nonce || AES-GCM(plaintext), associated data = seed|disk|index|
                   offset|length, so a chunk moved to another place or seed fails to open
    manifest.enc   encrypted: machine metadata, the restore point, its commit token, and per
                   chunk the sha256 of the stored file and of every 1 MiB plaintext block
    SHA256SUMS     clear sha256 of every stored file: ``sha256sum -c`` checks a copy of the
                   media without the key

Why the plaintext hashes are encrypted: a hash of a known block tells an outsider which
software a disk holds; the stored-file hashes say nothing about the contents.

Resume: an export skips chunks whose journal record and file are both there (a chunk file is
written to a temporary name, fsynced, renamed, then journalled). An import records each
chunk in the sync journal (``sync_extents``) after the flush that covers it and resumes
into the same partial overlay. A corrupt or missing chunk stops the import with the chunk
named; every disk is read back equal to the seed before any is sealed, and only then is
the restore point recorded.

The key never travels in argv or the store: jobs carry the PATH of a key file (32 random
bytes, hex or raw; ``ferryman seed keygen``) or of a passphrase file (scrypt), and the daemon
reads it when the job (re)starts.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbd
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from appliance import inventory
from appliance.datapath import extents as ex
from appliance.datapath.chain import DiskChain, Overlay
from appliance.datapath.chain import _write_atomic as _write_file
from appliance.datapath.copier import ProgressSink, connect
from appliance.datapath.hashing import BLOCK_SIZE, HashManifest, _zero_hash, hash_export
from appliance.datapath.writer import QemuNbd
from appliance.errors import Cancelled, Conflict, FerrymanError, NotFound
from appliance.units import GiB, MiB, human_bytes

log = logging.getLogger(__name__)

FORMAT = "ferryman-seed/1"
CHUNK_SIZE = 64 * MiB  # one file per 64 MiB: 16 files per GiB, each fsynced once
MAX_CHUNK = 1 * GiB  # AES-GCM and this process hold a whole chunk in memory
IO_REQUEST = 32 * MiB  # qemu-nbd refuses NBD requests over 32 MiB
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12  # AES-GCM's standard nonce; random per chunk (far below 2^32 chunks)
TAG_BYTES = 16
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1  # 32 MiB and ~0.1 s per guess of a passphrase
MIN_PASSPHRASE = 12

HEADER = "seed.json"
JOURNAL = "journal.jsonl"
MANIFEST = "manifest.enc"
SUMS = "SHA256SUMS"
LOCK = ".lock"


class SeedError(FerrymanError):
    code = "seed"


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def _unb64(s: str) -> bytes:
    return base64.b64decode(s.encode())


def _where(disk: str, offset: int) -> str:
    return f"disk {disk}, offset {offset} ({human_bytes(offset)})"


# -- keys --------------------------------------------------------------------------------


def keygen(path: Path) -> Path:
    """Write a new random key as hex into a new file, mode 0600. Never overwrites."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise SeedError(
            f"{path} already exists", hint="keep that key, or name a new file for a new one"
        ) from e
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def _read_secret(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except OSError as e:
        raise SeedError(
            f"cannot read the {what} {path}: {e.strerror}",
            hint="give the path of a file ferrymand (root) can read",
        ) from e


def new_kdf(key_file: str | None, passphrase_file: str | None) -> dict[str, Any]:
    """How the key is made, stored in the header (never the key itself)."""
    if passphrase_file:
        return {
            "kind": "scrypt",
            "salt": _b64(os.urandom(16)),
            "n": SCRYPT_N,
            "r": SCRYPT_R,
            "p": SCRYPT_P,
        }
    return {"kind": "key-file"}


def derive_key(kdf: dict[str, Any], key_file: str | None, passphrase_file: str | None) -> bytes:
    if kdf["kind"] == "scrypt":
        if not passphrase_file:
            raise SeedError(
                "this seed was made with a passphrase", hint="pass it with --passphrase-file FILE"
            )
        text = _read_secret(passphrase_file, "passphrase file").split(b"\n", 1)[0].rstrip(b"\r")
        if len(text) < MIN_PASSPHRASE:
            raise SeedError(
                f"the passphrase in {passphrase_file} has {len(text)} characters",
                hint=f"use at least {MIN_PASSPHRASE}, or a key file (ferryman seed keygen FILE)",
            )
        return Scrypt(
            salt=_unb64(kdf["salt"]), length=KEY_BYTES, n=kdf["n"], r=kdf["r"], p=kdf["p"]
        ).derive(text)
    if not key_file:
        raise SeedError(
            "this seed was made with a key file", hint="pass the same one with --key-file FILE"
        )
    raw = _read_secret(key_file, "key file")
    text = raw.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(raw) == KEY_BYTES:
        return raw
    raise SeedError(
        f"the key file {key_file} does not hold a key ({len(raw)} bytes; a key is 32 random "
        "bytes or 64 hex digits)",
        hint="make one with: ferryman seed keygen FILE, or use --passphrase-file",
    )


class Sealer:
    """AES-256-GCM with a random nonce per message; associated data binds each message to
    its place in one seed."""

    def __init__(self, key: bytes, seed_id: str) -> None:
        self._aead = AESGCM(key)
        self.seed_id = seed_id

    def seal(self, data: bytes | bytearray, place: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, f"{self.seed_id}|{place}".encode())

    def open(self, blob: bytes, place: str) -> bytes:
        """Raises InvalidTag when the blob was altered, moved, or the key is wrong."""
        return self._aead.decrypt(
            blob[:NONCE_BYTES], blob[NONCE_BYTES:], f"{self.seed_id}|{place}".encode()
        )


KEY_CHECK = b"ferryman seed key check"


def _sealer_for(
    header: dict[str, Any], key_file: str | None, passphrase_file: str | None
) -> Sealer:
    key = derive_key(header["kdf"], key_file, passphrase_file)
    s = Sealer(key, header["seed_id"])
    try:
        if s.open(_unb64(header["key_check"]), "key-check") != KEY_CHECK:
            raise InvalidTag
    except InvalidTag as e:
        what = "passphrase" if header["kdf"]["kind"] == "scrypt" else "key file"
        raise SeedError(
            f"the {what} does not open the seed {header['seed_id']} of {header['machine']['name']}",
            hint=f"use the {what} given at its export",
        ) from e
    return s


# -- the seed directory ---------------------------------------------------------------------


def chunk_place(disk: str, index: int, offset: int, length: int) -> str:
    return f"{disk}|{index}|{offset}|{length}"


def chunk_file(root: Path, disk: str, index: int) -> Path:
    return root / disk / f"{index:06d}.chunk"


def read_header(root: Path) -> dict[str, Any]:
    p = root / HEADER
    if not p.exists():
        raise SeedError(
            f"{root} holds no Ferryman seed (no {HEADER})",
            hint="name the directory ferryman seed export wrote (the mount point of the media)",
        )
    try:
        h: dict[str, Any] = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise SeedError(
            f"{p} is damaged: {e}", hint="copy the seed again from the source site"
        ) from e
    if h.get("format") != FORMAT:
        raise SeedError(
            f"{p} is format {h.get('format')!r}, this Ferryman reads {FORMAT}",
            hint="import it with the Ferryman version that exported it",
        )
    return h


def _chunks(size: int, chunk_size: int) -> int:
    return (size + chunk_size - 1) // chunk_size


def _journal(root: Path, sealer: Sealer) -> dict[tuple[str, int], dict[str, Any]]:
    """Finished chunks per (disk, index); the last record of a chunk wins. A torn or
    altered line is skipped: that chunk is simply exported again."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    p = root / JOURNAL
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(sealer.open(_unb64(line.strip()), "journal"))
        except (ValueError, InvalidTag):
            continue
        out[(rec["disk"], rec["index"])] = rec
    return out


@contextlib.contextmanager
def _locked(root: Path, what: str) -> Iterator[None]:
    """One export per seed directory at a time (two appliances may share a NAS)."""
    fd = os.open(root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise Conflict(
                f"{root} is in use by another seed {what}", hint="wait for it to finish"
            ) from e
        yield
    finally:
        os.close(fd)


# -- export --------------------------------------------------------------------------------


@dataclass
class ExportRequest:
    machine: str
    point: int  # restore point id, fixed when the job was submitted
    to: Path
    key_file: str | None = None
    passphrase_file: str | None = None
    chunk_size: int = CHUNK_SIZE


def check_chunk_size(n: int) -> int:
    if n < BLOCK_SIZE or n > MAX_CHUNK or n % BLOCK_SIZE:
        raise SeedError(
            f"chunk size {n} is not a whole number of MiB between 1 MiB and 1 GiB",
            hint="the default 64 MiB suits USB disks and network shares",
        )
    return n


def _metadata(db: Any, m: dict[str, Any], rp: dict[str, Any]) -> dict[str, Any]:
    src = inventory.source_row(db, str(m["source_id"]))
    keep = ("name", "ref", "guest_os", "cpus", "memory_mib", "firmware", "nics", "details")
    return {
        "machine": {k: m[k] for k in keep},
        "source": {"name": src["name"], "kind": src["kind"], "uri": src["uri"]},
        "disks": [
            {"key": k, "size": s, "label": lb}
            for k, s, lb in db.execute(
                "SELECT key, size, label FROM disks WHERE machine_id=? ORDER BY key", [m["id"]]
            )
        ],
        "point": {
            "id": rp["id"],
            "snapshot_id": rp["snapshot_id"],
            "source_time": rp["source_time"],
            "consistency": rp["consistency"],
            "verified": rp["verified"],
            "inspection": rp["inspection"],
        },
        "token": rp["token"],
    }


def _new_header(
    req: ExportRequest, m: dict[str, Any], rp: dict[str, Any]
) -> tuple[dict[str, Any], Sealer]:
    seed_id = uuid.uuid4().hex
    kdf = new_kdf(req.key_file, req.passphrase_file)
    sealer = Sealer(derive_key(kdf, req.key_file, req.passphrase_file), seed_id)
    header = {
        "format": FORMAT,
        "seed_id": seed_id,
        "state": "exporting",
        "machine": {"name": m["name"], "ref": m["ref"]},
        "point": {
            "id": rp["id"],
            "snapshot_id": rp["snapshot_id"],
            "source_time": rp["source_time"],
        },
        "chunk_size": req.chunk_size,
        "block_size": BLOCK_SIZE,
        "disks": [
            {"key": d["disk_key"], "size": d["size"], "chunks": _chunks(d["size"], req.chunk_size)}
            for d in rp["disks"]
        ],
        "kdf": kdf,
        "key_check": _b64(sealer.seal(KEY_CHECK, "key-check")),
    }
    return header, sealer


def _open_for_export(
    req: ExportRequest, m: dict[str, Any], rp: dict[str, Any]
) -> tuple[dict[str, Any], Sealer, bool]:
    """The seed header of this export: a new one in an empty directory, or the one a
    previous (interrupted) export of the same point left there."""
    if (req.to / HEADER).exists():
        header = read_header(req.to)
        same = (
            header["machine"]["ref"] == m["ref"]
            and header["point"]["snapshot_id"] == rp["snapshot_id"]
            and header["chunk_size"] == req.chunk_size
        )
        if not same:
            raise SeedError(
                f"{req.to} holds a seed of {header['machine']['name']} point "
                f"{header['point']['id']} (chunks of {human_bytes(header['chunk_size'])}), "
                f"not of {m['name']} point {rp['id']}",
                hint="export into an empty directory, or repeat that export's options to resume it",
            )
        return header, _sealer_for(header, req.key_file, req.passphrase_file), True
    if any(p.name not in (LOCK, "lost+found") for p in req.to.iterdir()):
        raise SeedError(
            f"{req.to} is not empty and holds no seed",
            hint="export into an empty directory (e.g. a new folder on the media)",
        )
    header, sealer = _new_header(req, m, rp)
    return header, sealer, False


def _read_range(h: Any, offset: int, length: int, max_req: int) -> bytearray:
    out = bytearray()
    for pos in range(offset, offset + length, max_req):
        out += h.pread(min(max_req, offset + length - pos), pos)
    return out


def _zero_ranges(exts: list[Any]) -> list[tuple[int, int]]:
    return [(e.offset, e.end) for e in exts if e.zero]


def _all_zero(zeros: list[tuple[int, int]], start: int, end: int) -> bool:
    return any(a <= start and end <= b for a, b in zeros)  # extents are merged: one covers it


def export_seed(
    db: Any,
    req: ExportRequest,
    *,
    socket_dir: Path,
    progress: ProgressSink | None = None,
    cancel: threading.Event | None = None,
    event: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    check_chunk_size(req.chunk_size)
    m = inventory.machine_row(db, req.machine)
    rp = next((r for r in inventory.restore_points(db, m["id"]) if r["id"] == req.point), None)
    if rp is None:
        raise NotFound(
            f"no restore point {req.point} of {m['name']}",
            hint=f"list them with: ferryman points {m['name']}",
        )
    try:
        req.to.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SeedError(
            f"cannot create {req.to}: {e.strerror}", hint="mount the media and check it is writable"
        ) from e
    with _locked(req.to, "export"):
        header, sealer, resumed = _open_for_export(req, m, rp)
        # "exporting" until the manifest is rewritten: a repaired chunk changes it.
        header["state"] = "exporting"
        _write_file(req.to / HEADER, json.dumps(header, indent=1).encode())
        done = _journal(req.to, sealer)
        total = sum(d["size"] for d in rp["disks"])
        if progress is not None:
            progress.set_total(total)
        stats = {
            "chunks_written": 0,
            "chunks_skipped_resume": 0,
            "chunks_zero": 0,
            "bytes_stored": 0,
        }
        from appliance.replication import point_name

        pname = point_name(int(rp["session_id"]))
        jp = req.to / JOURNAL
        if jp.exists() and jp.stat().st_size and not jp.read_bytes().endswith(b"\n"):
            with open(jp, "a") as torn:  # a record torn by a crash stays alone on its line
                torn.write("\n")
        with contextlib.ExitStack() as stack, open(jp, "a") as journal:
            # Hold every disk of the point for the whole export: retention waits.
            paths = {
                d["disk_key"]: stack.enter_context(
                    DiskChain(Path(d["path"]).parent).reading(pname, f"seed export to {req.to}")
                )
                for d in rp["disks"]
            }
            for d in rp["disks"]:
                key, size = d["disk_key"], int(d["size"])
                (req.to / key).mkdir(exist_ok=True)
                want = None
                if d["manifest"] and Path(d["manifest"]).exists():
                    want = HashManifest.load(Path(d["manifest"]))
                    if (want.size, want.block_size) != (size, BLOCK_SIZE):
                        want = None
                with QemuNbd(paths[key], socket_dir, read_only=True) as reader:
                    _export_disk(
                        _DiskJob(reader.uri, key, size, req, sealer, want, journal),
                        done,
                        stats,
                        progress,
                        cancel,
                    )
        meta = _metadata(db, m, rp)
        header = _finish_export(req.to, header, sealer, meta, done)
    event(
        f"seed {header['seed_id']} of {m['name']} point {rp['id']} exported to {req.to} "
        f"({stats['chunks_written']} chunks written, {stats['chunks_skipped_resume']} "
        f"already there, {stats['chunks_zero']} zero)"
    )
    return {
        "seed_id": header["seed_id"],
        "dir": str(req.to),
        "machine": m["name"],
        "point": rp["id"],
        "resumed": resumed,
        **stats,
    }


@dataclass
class _DiskJob:
    uri: str  # the restore point's disk, served read-only
    key: str
    size: int
    req: ExportRequest
    sealer: Sealer
    want: HashManifest | None  # the point's own hashes: bit rot is not exported
    journal: Any  # the open journal file


def _export_disk(
    job: _DiskJob,
    done: dict[tuple[str, int], dict[str, Any]],
    stats: dict[str, int],
    progress: ProgressSink | None,
    cancel: threading.Event | None,
) -> None:
    """Export the chunks of one disk that are not on the media yet. The next chunk is read
    by a second thread while this one hashes, encrypts and writes; once the extents are
    known, only that thread uses the handle (one native handle per thread)."""
    key, size, cs = job.key, job.size, job.req.chunk_size
    h = connect(job.uri, name=f"seed-{key}", contexts=[ex.BASE_ALLOCATION])
    max_req = min(IO_REQUEST, int(h.get_block_size(nbd.SIZE_MAXIMUM) or IO_REQUEST))
    zeros = _zero_ranges(ex.query_extents(h, size)[0])
    todo: list[tuple[int, int, int]] = []
    for index in range(_chunks(size, cs)):
        offset, length = index * cs, min(cs, size - index * cs)
        rec = done.get((key, index))
        f = chunk_file(job.req.to, key, index)
        stored = f.exists() and f.stat().st_size == length + NONCE_BYTES + TAG_BYTES
        if rec is not None and (rec["zero"] or stored):
            stats["chunks_skipped_resume"] += 1
            if progress is not None:
                progress.update(length)
        else:
            todo.append((index, offset, length))

    def load(i: int) -> bytearray | None:
        _index, offset, length = todo[i]
        if _all_zero(zeros, offset, offset + length):
            return None
        return _read_range(h, offset, length, max_req)

    with ThreadPoolExecutor(1, thread_name_prefix=f"seed-read-{key}") as pool:
        nxt = pool.submit(load, 0) if todo else None
        for i, (index, offset, length) in enumerate(todo):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"seed export of {job.req.machine} cancelled")
            assert nxt is not None
            data = nxt.result()
            nxt = pool.submit(load, i + 1) if i + 1 < len(todo) else None
            f = chunk_file(job.req.to, key, index)
            try:
                rec = _export_chunk(job.sealer, f, key, index, offset, length, data, job.want)
                job.journal.write(_b64(job.sealer.seal(json.dumps(rec).encode(), "journal")))
                job.journal.write("\n")
                job.journal.flush()
                os.fsync(job.journal.fileno())
            except OSError as e:
                raise SeedError(
                    f"cannot write chunk {key}/{index:06d} to {job.req.to}: {e.strerror}",
                    hint="free space on the media (or use a bigger one), then run the same "
                    "export again: it resumes",
                ) from e
            stats["chunks_zero" if rec["zero"] else "chunks_written"] += 1
            stats["bytes_stored"] += 0 if rec["zero"] else length
            done[(key, index)] = rec
            if progress is not None:
                progress.update(length)
    h.shutdown()


def _export_chunk(
    sealer: Sealer,
    f: Path,
    key: str,
    index: int,
    offset: int,
    length: int,
    data: bytearray | None,
    want: HashManifest | None,
) -> dict[str, Any]:
    rec: dict[str, Any] = {"disk": key, "index": index, "offset": offset, "length": length}
    zero = {**rec, "zero": True, "stored_sha256": None, "blocks": None}
    if data is None:
        return zero
    view = memoryview(data)
    blocks = [
        hashlib.sha256(view[i : i + BLOCK_SIZE]).digest() for i in range(0, length, BLOCK_SIZE)
    ]
    # Allocated but all zero is not stored either; the block hashes say so for free.
    if all(b == _zero_hash(min(BLOCK_SIZE, length - j * BLOCK_SIZE)) for j, b in enumerate(blocks)):
        return zero
    if want is not None:
        first = offset // BLOCK_SIZE
        for j, b in enumerate(blocks):
            if want.hashes[first + j] and want.hashes[first + j] != b:
                raise SeedError(
                    f"the restore point differs from the hashes taken when it was made at "
                    f"{_where(key, offset + j * BLOCK_SIZE)}",
                    hint="it is damaged: run ferryman verify on it, then export a good point",
                )
    blob = sealer.seal(data, chunk_place(key, index, offset, length))
    _write_file(f, blob)
    return {
        **rec,
        "zero": False,
        "stored_sha256": hashlib.sha256(blob).hexdigest(),
        "blocks": [b.hex() for b in blocks],
    }


def _finish_export(
    root: Path,
    header: dict[str, Any],
    sealer: Sealer,
    meta: dict[str, Any],
    done: dict[tuple[str, int], dict[str, Any]],
) -> dict[str, Any]:
    disks: dict[str, Any] = {}
    sums: list[str] = []
    data_bytes = zero_chunks = 0
    for d in header["disks"]:
        recs = [done[(d["key"], i)] for i in range(d["chunks"])]
        disks[d["key"]] = {"size": d["size"], "chunks": recs}
        for r in recs:
            if r["zero"]:
                zero_chunks += 1
            else:
                data_bytes += r["length"]
                sums.append(f"{r['stored_sha256']}  {d['key']}/{r['index']:06d}.chunk")
    body = {**meta, "seed_id": header["seed_id"], "block_size": BLOCK_SIZE, "disks": disks}
    blob = sealer.seal(json.dumps(body).encode(), "manifest")
    _write_file(root / MANIFEST, blob)
    digest = hashlib.sha256(blob).hexdigest()
    _write_file(root / SUMS, ("\n".join([f"{digest}  {MANIFEST}", *sums]) + "\n").encode())
    header = {
        **header,
        "state": "complete",
        "manifest_sha256": digest,
        "data_bytes": data_bytes,
        "zero_chunks": zero_chunks,
    }
    _write_file(root / HEADER, json.dumps(header, indent=1).encode())
    return header


# -- reading a seed (import, verify) ---------------------------------------------------------


@dataclass
class Seed:
    root: Path
    header: dict[str, Any]
    sealer: Sealer
    body: dict[str, Any]  # the decrypted manifest

    @property
    def machine_name(self) -> str:
        return str(self.header["machine"]["name"])

    def disks(self) -> list[tuple[str, int, list[dict[str, Any]]]]:
        return [(k, int(v["size"]), v["chunks"]) for k, v in self.body["disks"].items()]


def _incomplete(root: Path, header: dict[str, Any], sealer: Sealer) -> SeedError:
    done = _journal(root, sealer)
    for d in header["disks"]:
        for i in range(d["chunks"]):
            if (d["key"], i) not in done:
                return SeedError(
                    f"the seed in {root} is incomplete: its export stopped before chunk "
                    f"{d['key']}/{i:06d} ({_where(d['key'], i * header['chunk_size'])})",
                    hint=f"finish it at the source site: run the same ferryman seed export of "
                    f"{header['machine']['name']} again, it resumes",
                )
    return SeedError(
        f"the seed in {root} is incomplete: its export did not write the manifest",
        hint="run the same ferryman seed export again at the source site; it resumes",
    )


def open_seed(root: Path, key_file: str | None, passphrase_file: str | None) -> Seed:
    """Header, key, manifest; and every stored chunk present with its size (no reads)."""
    header = read_header(root)
    sealer = _sealer_for(header, key_file, passphrase_file)
    if header.get("state") != "complete":
        raise _incomplete(root, header, sealer)
    fix = "copy the seed directory again from the source site"
    try:
        blob = (root / MANIFEST).read_bytes()
    except OSError as e:
        raise SeedError(f"cannot read {root / MANIFEST}: {e.strerror}", hint=fix) from e
    try:
        if hashlib.sha256(blob).hexdigest() != header.get("manifest_sha256"):
            raise InvalidTag
        body = json.loads(sealer.open(blob, "manifest"))
    except (InvalidTag, ValueError) as e:
        raise SeedError(f"{root / MANIFEST} is damaged (authentication failed)", hint=fix) from e
    seed = Seed(root, header, sealer, body)
    for key, _size, recs in seed.disks():
        for r in recs:
            if r["zero"]:
                continue
            f = chunk_file(root, key, r["index"])
            want = r["length"] + NONCE_BYTES + TAG_BYTES
            have = f.stat().st_size if f.exists() else None
            if have != want:
                state = "missing" if have is None else f"{have} bytes instead of {want}"
                raise SeedError(
                    f"seed chunk {key}/{r['index']:06d}.chunk ({_where(key, r['offset'])}) is "
                    f"{state} in {root}",
                    hint=_chunk_fix(seed),
                )
    return seed


def _chunk_fix(seed: Seed) -> str:
    return (
        "copy that file again from the exported seed, or delete it and re-run the same "
        f"seed export of {seed.machine_name} at the source site, which rewrites only missing "
        "chunks; then import again: it resumes"
    )


def read_chunk(seed: Seed, key: str, rec: dict[str, Any]) -> bytes:
    """The plaintext of one chunk, checked three ways: the stored file's sha256, AES-GCM
    authentication, and the sha256 of every 1 MiB block. Names the first bad place."""
    f = chunk_file(seed.root, key, rec["index"])
    name = f"seed chunk {key}/{rec['index']:06d}.chunk"
    try:
        blob = f.read_bytes()
    except OSError as e:
        raise SeedError(
            f"cannot read {name} ({_where(key, rec['offset'])}): {e.strerror}",
            hint=_chunk_fix(seed),
        ) from e
    if hashlib.sha256(blob).hexdigest() != rec["stored_sha256"]:
        raise SeedError(
            f"{name} ({_where(key, rec['offset'])}, {human_bytes(rec['length'])}) is corrupt: "
            "its sha256 differs from the manifest",
            hint=_chunk_fix(seed),
        )
    try:
        data = seed.sealer.open(blob, chunk_place(key, rec["index"], rec["offset"], rec["length"]))
    except InvalidTag as e:
        raise SeedError(
            f"{name} ({_where(key, rec['offset'])}) fails authentication", hint=_chunk_fix(seed)
        ) from e
    for j, want in enumerate(rec["blocks"]):
        pos = j * BLOCK_SIZE
        if hashlib.sha256(memoryview(data)[pos : pos + BLOCK_SIZE]).hexdigest() != want:
            raise SeedError(
                f"{name}: block at {_where(key, rec['offset'] + pos)} differs from its hash",
                hint=_chunk_fix(seed),
            )
    return data


def manifest_of(size: int, recs: list[dict[str, Any]]) -> HashManifest:
    """The restore point's block-hash manifest, straight from the seed."""
    man = HashManifest(size=size, block_size=BLOCK_SIZE)
    for r in recs:
        first = r["offset"] // BLOCK_SIZE
        n = -(-r["length"] // BLOCK_SIZE)
        for j in range(n):
            man.hashes[first + j] = (
                _zero_hash(man.block_len(first + j)) if r["zero"] else bytes.fromhex(r["blocks"][j])
            )
    return man


def verify_seed(
    root: Path,
    key_file: str | None,
    passphrase_file: str | None,
    *,
    progress: ProgressSink | None = None,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Read and check every chunk without importing (before shipping, or on arrival)."""
    seed = open_seed(root, key_file, passphrase_file)
    if progress is not None:
        progress.set_total(sum(size for _k, size, _r in seed.disks()))
    checked = 0
    for key, _size, recs in seed.disks():
        for r in recs:
            if cancel is not None and cancel.is_set():
                raise Cancelled("seed verify cancelled")
            if not r["zero"]:
                read_chunk(seed, key, r)
                checked += 1
            if progress is not None:
                progress.update(r["length"])
    return {
        "seed_id": seed.header["seed_id"],
        "machine": seed.machine_name,
        "chunks_checked": checked,
        "ok": True,
    }


# -- import ---------------------------------------------------------------------------------


def _match_machine(db: Any, seed: Seed, m: dict[str, Any]) -> None:
    """The seed must fit the machine it becomes the first restore point of."""
    src = inventory.source_row(db, str(m["source_id"]))
    seed_kind = seed.body["source"]["kind"]
    if src["kind"] != seed_kind:
        raise SeedError(
            f"the seed was made from a {seed_kind} source; {m['name']} here comes from "
            f"{src['kind']} source {src['name']}",
            hint="register the same source here (ferryman source add) and discover it",
        )
    have = {
        k: int(s)
        for k, s in db.execute("SELECT key, size FROM disks WHERE machine_id=?", [m["id"]])
    }
    seeded = {k: size for k, size, _r in seed.disks()}
    if have != seeded:
        raise SeedError(
            f"{m['name']} here has disks {_fmt_disks(have)}, the seed has {_fmt_disks(seeded)}",
            hint="import into the machine the seed was made from (--machine NAME), or "
            "rediscover its source if a disk was added or resized",
        )
    rps = inventory.restore_points(db, m["id"])
    if rps:
        raise Conflict(
            f"{m['name']} already has {len(rps)} restore point(s); a seed only starts a chain",
            hint="import into a machine with no restore points yet",
        )


def _fmt_disks(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {human_bytes(v)}" for k, v in sorted(d.items())) or "none"


def _import_disk(
    ctx: Any,
    seed: Seed,
    ov: Overlay,
    journal: Any,
    key: str,
    recs: list[dict[str, Any]],
    stats: dict[str, int],
) -> None:
    """Write one disk's chunks into its partial overlay; each chunk is journalled after the
    flush that covers it. The overlay is left stopped and unsealed."""
    from appliance.replication import writer_dir

    done = {o for o, _n in journal.extents(key)}
    # The next chunk is read and checked by a second thread while this one writes.
    data_recs = [r for r in recs if not r["zero"] and r["offset"] not in done]
    uri = ov.start_writer(writer_dir())
    try:
        h = connect(uri, name=f"seed-import-{key}")
        max_req = min(IO_REQUEST, int(h.get_block_size(nbd.SIZE_MAXIMUM) or IO_REQUEST))
        with ThreadPoolExecutor(1, thread_name_prefix=f"seed-check-{key}") as pool:
            ahead = [pool.submit(read_chunk, seed, key, r) for r in data_recs[:1]]
            nxt = 1
            for r in recs:
                ctx.check_cancel()
                if r["offset"] in done:
                    stats["bytes_skipped_resume"] += r["length"]
                elif r["zero"]:  # a new base reads as zeroes: nothing to write
                    journal.done(key, r["offset"], r["length"])
                    stats["bytes_zero"] += r["length"]
                else:
                    data = memoryview(ahead.pop().result())  # names the first bad chunk
                    if nxt < len(data_recs):
                        ahead.append(pool.submit(read_chunk, seed, key, data_recs[nxt]))
                        nxt += 1
                    for pos in range(0, len(data), max_req):
                        h.pwrite(data[pos : pos + max_req], r["offset"] + pos)  # no copy
                    h.flush()  # the journal never claims what is not durable
                    journal.done(key, r["offset"], r["length"])
                    stats["bytes_written"] += r["length"]
                ctx.progress.update(r["length"])
        h.shutdown()
        ov.stop_writer()
    except BaseException:
        # What was flushed stays in the partial for a resume of this same seed.
        try:
            ov.stop_writer()
        except Exception:  # the writer died: the error that stopped the import matters
            ov.kill_writer()
        raise


def run_import(ctx: Any) -> dict[str, Any]:
    """Job 'seed-import': the seed becomes the machine's first restore point (a chain base)."""
    from appliance.replication import (
        StoreJournal,
        chain_for,
        machine_dir,
        point_name,
        reconcile,
        record_point_disks,
        writer_dir,
    )
    from store.db import dumps, now, write_txn

    db = ctx.db
    root = Path(ctx.params["dir"])
    m = inventory.machine_row(db, str(ctx.machine_id))
    ctx.progress.set_phase("opening the seed")
    seed = open_seed(root, ctx.params.get("key_file"), ctx.params.get("passphrase_file"))
    pt = seed.body["point"]
    snapshot_id = str(pt["snapshot_id"])
    reason = f"seed import {seed.header['seed_id']}"
    imported = db.execute(
        "SELECT r.id FROM restore_points r JOIN sync_sessions s ON s.id=r.session_id "
        "WHERE r.machine_id=? AND s.reason=? AND r.state='sealed'",
        [m["id"], reason],
    ).fetchone()
    if imported is not None:  # a daemon crash after the record: the import is done
        return {
            "restore_point": int(imported[0]),
            "seed_id": seed.header["seed_id"],
            "machine": m["name"],
        }
    _match_machine(db, seed, m)
    row = db.execute(
        "SELECT id FROM sync_sessions WHERE machine_id=? AND state='copying' AND snapshot_id=? "
        "AND reason=? ORDER BY id DESC LIMIT 1",
        [m["id"], snapshot_id, reason],
    ).fetchone()
    if row is None:
        db.execute(
            "UPDATE sync_sessions SET state='abandoned', ended_at=? WHERE machine_id=? AND "
            "state='copying'",
            [now(), m["id"]],
        )
        cur = db.execute(
            "INSERT INTO sync_sessions (machine_id, job_id, snapshot_id, parent_rp_id, full, "
            "reason, state, started_at) VALUES (?,?,?,NULL,1,?,'copying',?)",
            [m["id"], ctx.job_id, snapshot_id, reason, now()],
        )
        sid = int(cur.lastrowid or 0)
    else:
        sid = int(row[0])
        ctx.event(f"resuming the import of seed {seed.header['seed_id']} (session {sid})")
    journal = StoreJournal(db, sid)
    name = point_name(sid)
    mdir = machine_dir(m["id"])
    chains = {k: chain_for(mdir, k, size) for k, size, _r in seed.disks()}
    for line in reconcile(db, m["id"], chains):
        ctx.event(f"{m['name']}: {line}", level="warning")
    ctx.progress.set_total(sum(size for _k, size, _r in seed.disks()))
    stats = {"bytes_written": 0, "bytes_zero": 0, "bytes_skipped_resume": 0}
    staged = []
    for i, (key, size, recs) in enumerate(seed.disks()):
        ctx.progress.set_phase(f"importing disk {key} ({i + 1}/{len(chains)})", disk=key)
        ov = chains[key].begin(name, snapshot_id, size)
        if not ov.resumed:  # journal rows without their partial overlay mean nothing
            db.execute("DELETE FROM sync_extents WHERE session_id=? AND disk_key=?", [sid, key])
        _import_disk(ctx, seed, ov, journal, key, recs, stats)
        staged.append((key, ov, manifest_of(size, recs)))
    # Read every disk back before anything is sealed: equal to the seed, block for block.
    for key, ov, man in staged:
        ctx.progress.set_phase(f"reading back disk {key}")
        with QemuNbd(ov.path, writer_dir(), read_only=True) as reader:
            got = hash_export(reader.uri, disk=key, cancel=ctx.cancel)
        bad = man.diff(got)
        if bad:
            raise SeedError(
                f"the imported disk {key} reads back different from the seed at "
                f"{_where(key, bad[0])}",
                hint="check the volume store's disk (ferryman doctor); run the import again",
            )
    disks_out: list[dict[str, Any]] = []
    for key, ov, man in staged:
        size = ov.size
        point = ov.seal()
        mp = ov.chain.dir / f"{point.name}.manifest.json"
        man.save(mp)
        path = str(ov.chain.dir / point.file)
        disks_out.append({"disk_key": key, "path": path, "size": size, "manifest": str(mp)})
    token = seed.body["token"]
    with write_txn(db):
        cur = db.execute(
            "INSERT INTO restore_points (machine_id, session_id, parent_id, snapshot_id, "
            "source_time, sealed_at, consistency, full, token, verified, verified_at, "
            "bytes_written, inspection) VALUES (?,?,NULL,?,?,?,?,1,?,'ok',?,?,?)",
            [
                m["id"],
                sid,
                snapshot_id,
                pt["source_time"],
                now(),
                pt["consistency"],
                dumps(token),
                now(),
                stats["bytes_written"],
                dumps(pt["inspection"]) if pt.get("inspection") else None,
            ],
        )
        rp_id = int(cur.lastrowid or 0)
        record_point_disks(db, rp_id, disks_out)
        db.execute(
            "UPDATE sync_sessions SET state='sealed', ended_at=?, bytes_written=? WHERE id=?",
            [now(), stats["bytes_written"], sid],
        )
        db.execute("DELETE FROM sync_extents WHERE session_id=?", [sid])
    ctx.event(
        f"restore point {rp_id} of {m['name']} imported from seed {seed.header['seed_id']} "
        f"(point {pt['id']} of the source site, source time {pt['source_time']}); the next "
        "sync is incremental",
        kind="sync",
    )
    return {
        "restore_point": rp_id,
        "seed_id": seed.header["seed_id"],
        "machine": m["name"],
        **stats,
    }


def run_export(ctx: Any) -> dict[str, Any]:
    """Job 'seed-export'. No machine lock: syncs go on; the point is held against retention."""
    from appliance.replication import writer_dir
    from store.records import add_event

    p = ctx.params
    req = ExportRequest(
        machine=p["machine"],
        point=int(p["point"]),
        to=Path(p["to"]),
        key_file=p.get("key_file"),
        passphrase_file=p.get("passphrase_file"),
        chunk_size=int(p.get("chunk_size") or CHUNK_SIZE),
    )
    machine_id = inventory.machine_row(ctx.db, req.machine)["id"]
    ctx.progress.set_phase(f"exporting {req.machine} point {req.point} to {req.to}")

    def event(msg: str) -> None:
        add_event(ctx.db, msg, kind="seed", machine_id=machine_id, job_id=ctx.job_id)

    return export_seed(
        ctx.db, req, socket_dir=writer_dir(), progress=ctx.progress, cancel=ctx.cancel, event=event
    )


def run_verify(ctx: Any) -> dict[str, Any]:
    """Job 'seed-verify'."""
    p = ctx.params
    ctx.progress.set_phase(f"checking the seed in {p['dir']}")
    return verify_seed(
        Path(p["dir"]),
        p.get("key_file"),
        p.get("passphrase_file"),
        progress=ctx.progress,
        cancel=ctx.cancel,
    )


def describe(root: Path) -> dict[str, Any]:
    """What the clear header says, plus which chunk files are on the media (no key needed)."""
    h = read_header(root)
    files = (
        sum(1 for d in h["disks"] for _ in (root / d["key"]).glob("*.chunk"))
        if root.exists()
        else 0
    )
    keep = (
        "seed_id",
        "state",
        "machine",
        "point",
        "chunk_size",
        "disks",
        "data_bytes",
        "zero_chunks",
    )
    return {
        **{k: h.get(k) for k in keep},
        "dir": str(root),
        "chunk_files": files,
        "kdf": h["kdf"]["kind"],
    }
