"""``ferryman support-bundle``: what a support engineer needs, as one tar.gz, never a secret.

Contents (under ``ferryman-support-HOST-STAMP/`` in the archive):

- ``README.txt``: what is inside and what was left out, and why;
- ``summary.json``: versions (Ferryman, the image manifest, the installed releases), host,
  time, and every collection step that failed;
- ``doctor.json``: ``ferryman doctor`` (``--quick`` unless asked for the full run);
- ``store/summary.json``: schema, integrity check, row counts per table, jobs by state;
- ``store/state-sanitized.db``: a consistent copy (``VACUUM INTO``) with the ``credentials``
  table dropped and the file vacuumed again, so no page of it survives; checked afterwards;
- ``logs/``: Ferryman's log files and the journal of its units (the last MAX_LOG_BYTES of each),
  libvirt's logs; lines that look like ``password=...`` and Fernet tokens are redacted;
- ``system/``: uname, os-release, disks, mounts, memory, addresses, failed units.

Never collected: the secret key, the live store file or its WAL, the credentials table.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import __version__
from appliance.config import paths
from appliance.errors import FerrymanError

MAX_LOG_BYTES = 4 * 1024 * 1024  # per file: the end of a log is what support reads
COMMAND_TIMEOUT_S = 30
JOURNAL_UNITS = ("ferrymand", "ferryman-firstboot", "libvirtd", "virtlogd", "ssh")
IMAGE_MANIFEST = Path("/etc/ferryman/image.json")
SYSTEM_COMMANDS: dict[str, list[str]] = {
    "uname.txt": ["uname", "-a"],
    "os-release.txt": ["cat", "/etc/os-release"],
    "df.txt": ["df", "-h"],
    "lsblk.txt": ["lsblk", "-o", "NAME,SIZE,TYPE,FSTYPE,LABEL,MOUNTPOINTS"],
    "findmnt.txt": ["findmnt", "-l"],
    "free.txt": ["free", "-m"],
    "ip-addr.txt": ["ip", "-br", "addr"],
    "systemctl-failed.txt": ["systemctl", "--failed", "--no-pager"],
    "ferryman-update-status.json": ["ferryman-update", "status", "--json"],
    "qemu-img-version.txt": ["qemu-img", "--version"],
    "virsh-list.txt": ["virsh", "-c", "qemu:///system", "list", "--all"],
}
# Defence in depth: the engine never logs secrets (reliability row 23), but a bundle leaves the
# site, so anything shaped like one is blanked anyway.
_SECRET_ASSIGN = re.compile(
    r"(?i)\b(password|passwd|pwd|secret|token|cookie|psk|api[_-]?key|authorization)"
    r"(\s*[=:]\s*|\"\s*:\s*\"|'\s*:\s*')([^\s\"',;&]+)"
)
_FERNET = re.compile(rb"gAAAAA[A-Za-z0-9_\-]{40,}={0,2}")


class SupportBundleError(FerrymanError):
    code = "support_bundle"


@dataclass
class Bundle:
    file: Path
    bytes: int
    members: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "bytes": self.bytes,
            "members": self.members,
            "notes": self.notes,
        }


def redact(data: bytes) -> bytes:
    """Blank values of ``password=...``-like assignments and Fernet tokens."""
    text = data.decode("utf-8", errors="replace")
    text = _SECRET_ASSIGN.sub(lambda m: f"{m.group(1)}{m.group(2)}[REDACTED]", text)
    return _FERNET.sub(b"[REDACTED-TOKEN]", text.encode("utf-8"))


def _tail(path: Path, limit: int = MAX_LOG_BYTES) -> bytes:
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - limit))
        data = f.read()
    if size > limit:
        data = b"[... %d earlier bytes left out ...]\n" % (size - limit) + data
    return data


def _run(argv: list[str]) -> tuple[bytes, str | None]:
    if shutil.which(argv[0]) is None:
        return b"", f"{argv[0]}: not installed"
    try:
        r = subprocess.run(argv, capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return b"", f"{argv[0]}: timed out after {COMMAND_TIMEOUT_S} s"
    except OSError as e:
        return b"", f"{argv[0]}: {e.strerror}"
    out = r.stdout + (b"\n[stderr]\n" + r.stderr if r.stderr else b"")
    return out, None if r.returncode == 0 else f"{' '.join(argv)}: exit status {r.returncode}"


# -- the store -------------------------------------------------------------------------------


def _tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' "
        "ORDER BY name"
    ).fetchall()
    return [str(r[0]) for r in rows]


def store_summary(db_path: Path) -> dict[str, Any]:
    """Schema, integrity and counts; reads no column of the credentials table but its count."""
    from store.db import integrity, open_readonly, schema_version

    db = open_readonly(db_path)
    try:
        conn = db.conn
        counts = {
            t: int(conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0]) for t in _tables(conn)
        }
        jobs: dict[str, int] = {}
        if "jobs" in counts:
            for state, n in conn.execute("SELECT state, count(*) FROM jobs GROUP BY state"):
                jobs[str(state)] = int(n)
        return {
            "file": str(db_path),
            "bytes": db_path.stat().st_size,
            "schema": schema_version(db),
            "integrity": integrity(db),
            "rows": counts,
            "jobs_by_state": jobs,
        }
    finally:
        db.close()


def sanitized_copy(db_path: Path, dest: Path) -> None:
    """A consistent copy of the store without the credentials table (not even in free pages)."""
    from store.db import backup, open_readonly

    db = open_readonly(db_path)
    try:
        secrets = [bytes(r[0]) for r in db.conn.execute("SELECT secret FROM credentials")]
        backup(db, dest)
    except sqlite3.Error as e:
        raise SupportBundleError(
            f"cannot copy the state store {db_path}: {e}",
            hint="check it with: ferryman store check",
        ) from e
    finally:
        db.close()
    conn = sqlite3.connect(dest, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys=OFF")
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("DROP TABLE IF EXISTS credentials")
        conn.execute("VACUUM")
        left = "credentials" in _tables(conn)
        ok = [r[0] for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()
    for suffix in ("-wal", "-shm", "-journal"):
        Path(f"{dest}{suffix}").unlink(missing_ok=True)
    raw = dest.read_bytes()
    if left or ok != ["ok"] or any(s and s in raw for s in secrets):
        dest.unlink(missing_ok=True)
        raise SupportBundleError(
            f"the sanitized store copy {dest} still holds credential data or failed its check",
            hint="run: ferryman support-bundle --no-store-copy",
        )


# -- collection ------------------------------------------------------------------------------


class _Stage:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.notes: list[str] = []

    def write(self, rel: str, data: bytes, *, scrub: bool = True) -> None:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(redact(data) if scrub else data)

    def step(self, what: str, fn: Callable[[], None]) -> None:
        """Run one collection step; a failure becomes a note, never a failed bundle."""
        try:
            fn()
        except FerrymanError as e:
            self.notes.append(f"{what}: {e}")
        except (OSError, sqlite3.Error, subprocess.SubprocessError, ValueError) as e:
            self.notes.append(f"{what}: {type(e).__name__}: {e}")


def _collect_logs(stage: _Stage, log_dir: Path) -> None:
    if log_dir.is_dir():
        for f in sorted(log_dir.rglob("*")):
            if f.is_file() and not f.is_symlink():
                stage.write(f"logs/ferryman/{f.relative_to(log_dir)}", _tail(f))
    else:
        stage.notes.append(f"logs: no log directory {log_dir}")
    libvirt = Path("/var/log/libvirt")
    if libvirt.is_dir() and os.access(libvirt, os.R_OK | os.X_OK):
        for f in sorted(libvirt.rglob("*.log")):
            if f.is_file() and os.access(f, os.R_OK):
                stage.write(f"logs/libvirt/{f.relative_to(libvirt)}", _tail(f))
    if Path("/run/systemd/system").is_dir():
        for unit in JOURNAL_UNITS:
            out, err = _run(
                ["journalctl", "-u", unit, "-n", "20000", "--no-pager", "-o", "short-iso"]
            )
            if err:
                stage.notes.append(f"journal {unit}: {err}")
            if out:
                stage.write(f"logs/journal/{unit}.log", out[-MAX_LOG_BYTES:])


def _collect_system(stage: _Stage) -> None:
    for name, argv in SYSTEM_COMMANDS.items():
        out, err = _run(argv)
        if err:
            stage.notes.append(f"system {name}: {err}")
        if out:
            stage.write(f"system/{name}", out)


def _versions() -> dict[str, Any]:
    info: dict[str, Any] = {"ferryman": __version__}
    if IMAGE_MANIFEST.exists():
        try:
            info["image"] = json.loads(IMAGE_MANIFEST.read_text())
        except (OSError, ValueError) as e:
            info["image"] = f"unreadable: {e}"
    return info


README = """Ferryman support bundle
=======================

summary.json     versions, host, time, and every collection step that did not work
doctor.json      ferryman doctor ({doctor})
store/           summary.json (schema, integrity, row counts){store_copy}
logs/            Ferryman's logs, the journal of its units, libvirt's logs (last {mib} MiB each)
system/          disks, mounts, memory, addresses, failed units, installed releases

Left out on purpose: the secret key ({key}), the live store and its WAL, and the
credentials table (the copy is made with VACUUM INTO, then the table is dropped and the file
vacuumed again). Values that look like passwords or tokens in logs read [REDACTED].
"""


def default_name() -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"ferryman-support-{socket.gethostname()}-{stamp}"


def collect(
    output: Path | None = None,
    *,
    full_doctor: bool = False,
    store_copy: bool = True,
    doctor_runner: Callable[[bool], dict[str, object]] | None = None,
) -> Bundle:
    """Write the bundle; ``output`` is a file name or a directory (default: the cwd)."""
    name = default_name()
    out = Path.cwd() if output is None else output
    if out.is_dir():
        out = out / f"{name}.tar.gz"
    if out.exists():
        raise SupportBundleError(f"{out} already exists", hint="choose another --output")
    if not os.access(out.parent, os.W_OK):
        raise SupportBundleError(
            f"cannot write the support bundle to {out.parent}",
            hint="pass --output with a writable directory, e.g. --output /tmp",
        )
    p = paths()
    with tempfile.TemporaryDirectory(prefix="ferryman-support-") as tmp:
        stage = _Stage(Path(tmp) / name)
        stage.root.mkdir()

        def doctor() -> None:
            if doctor_runner is not None:
                data = doctor_runner(not full_doctor)
            else:
                from appliance import doctor as d

                data = d.to_json(d.run(quick=not full_doctor))
            stage.write("doctor.json", json.dumps(data, indent=2).encode())

        def store() -> None:
            if not p.db.exists():
                stage.notes.append(f"store: no state store at {p.db}")
                return
            if not os.access(p.db, os.R_OK):
                stage.notes.append(
                    f"store: {p.db} is readable by root only; run with sudo for its summary"
                )
                return
            summary = store_summary(p.db)
            stage.write("store/summary.json", json.dumps(summary, indent=2).encode())
            if store_copy:
                dest = stage.root / "store" / "state-sanitized.db"
                sanitized_copy(p.db, dest)

        stage.step("doctor", doctor)
        stage.step("store", store)
        stage.step("logs", lambda: _collect_logs(stage, p.log_dir))
        stage.step("system", lambda: _collect_system(stage))
        summary = {
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "uid": os.getuid(),
            "versions": _versions(),
            "paths": {k: str(v) for k, v in vars(p).items()},
            "volume_store_mounted": os.path.ismount(p.volume_dir),
            "notes": stage.notes,
        }
        stage.write("summary.json", json.dumps(summary, indent=2).encode())
        stage.write(
            "README.txt",
            README.format(
                doctor="full run" if full_doctor else "--quick",
                store_copy=", state-sanitized.db (no credentials)" if store_copy else "",
                mib=MAX_LOG_BYTES // 2**20,
                key=f"{p.state_dir}/secret.key or secret.key.cred",
            ).encode(),
            scrub=False,
        )
        members = sorted(
            str(f.relative_to(stage.root.parent)) for f in stage.root.rglob("*") if f.is_file()
        )
        part = out.with_name(out.name + ".part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w:gz") as tar:
                for rel in members:
                    data = (stage.root.parent / rel).read_bytes()
                    ti = tarfile.TarInfo(rel)
                    ti.size, ti.mode, ti.mtime = (
                        len(data),
                        0o600,
                        int(datetime.datetime.now().timestamp()),
                    )
                    tar.addfile(ti, io.BytesIO(data))
            os.replace(part, out)
        except OSError as e:
            part.unlink(missing_ok=True)
            raise SupportBundleError(
                f"cannot write the support bundle {out}: {e.strerror}",
                hint="free space or pass --output with another directory",
            ) from e
    return Bundle(out, out.stat().st_size, members, stage.notes)
