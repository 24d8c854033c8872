"""Restore-point chains at file level: one directory per disk, a qcow2 chain inside.

    <volume_dir>/<machine>/<disk>/
        chain.json              ordered list of sealed points: name, file, snapshot_id, ...
        <point>.qcow2           sealed, read-only, never written again
        <point>.qcow2.partial   the overlay a sync is writing (never listed as a point)
        <point>.partial.json    which source snapshot the partial belongs to (resume check)
        readers/<point>/<id>.json   who reads a point (test-run overlays, verify, exports)

``chain.json`` is the truth for what exists; it is replaced atomically (write, fsync,
rename, fsync the directory). A file that is not in it and not partial is debris from a
crash and is removed by ``recover()``.

Why one overlay per sync: a sealed point is never written again, so a failure in a sync can
never damage an earlier restore point (reliability rows 12 and 19). The overlay's backing
file is named relative to the directory so a volume store can be moved.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.datapath.errors import ChainError, ReaderBusy, ResumeRefused, WriterError
from appliance.datapath.writer import QemuNbd

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
QEMU_IMG_TIMEOUT_S = 3600.0  # a commit of a large delta can take long; never hang forever


@dataclass
class Point:
    name: str
    file: str  # file name inside the disk directory
    snapshot_id: str
    size: int
    created_at: float
    sealed_at: float
    parent: str | None  # name of the point below, None for the base
    check: dict[str, Any] = field(default_factory=dict)  # qemu-img check summary
    state: str = "sealed"  # "sealed" | "merging" (being folded into its child)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: str | bytes) -> None:
    """Temporary name, fsync, rename, fsync the directory: the file is whole or absent."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def qemu_img(*args: str, timeout: float = QEMU_IMG_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-img", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def check_image(path: Path) -> dict[str, Any]:
    """``qemu-img check``: exit 0 clean, 3 leaked clusters only (harmless), 2 corrupt."""
    r = qemu_img("check", "--output=json", "-f", "qcow2", str(path))
    info: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        info = json.loads(r.stdout) if r.stdout.strip() else {}
    info["exit"] = r.returncode
    if r.returncode not in (0, 3):
        raise WriterError(
            f"qemu-img check of {path} failed with exit {r.returncode}: "
            f"{(r.stderr or r.stdout).strip()[-300:]}",
            hint="the image is damaged; it is not published as a restore point",
        )
    return info


class Overlay:
    """The file a sync writes: ``<point>.qcow2.partial`` over the newest sealed point."""

    def __init__(
        self, chain: DiskChain, name: str, snapshot_id: str, size: int, parent: Point | None
    ) -> None:
        self.chain = chain
        self.name = name
        self.snapshot_id = snapshot_id
        self.size = size
        self.parent = parent
        self.path = chain.dir / f"{name}.qcow2.partial"
        self.meta_path = chain.dir / f"{name}.partial.json"
        self.writer: QemuNbd | None = None
        self.resumed = False  # True: the partial of an interrupted sync of this snapshot

    @property
    def fresh(self) -> bool:
        """No backing file: the overlay reads as zeroes where nothing was written."""
        return self.parent is None

    def start_writer(self, socket_dir: Path, cache: str | None = None) -> str:
        """Serve the overlay read-write through qemu-nbd; returns its NBD URI."""
        if self.writer is not None and self.writer.alive:
            return self.writer.uri
        self.writer = QemuNbd(self.path, socket_dir, cache=cache).start()
        return self.writer.uri

    def stop_writer(self) -> None:
        if self.writer is not None:
            rc = self.writer.stop()
            self.writer = None
            if rc not in (0, -15):
                raise WriterError(
                    f"qemu-nbd writing {self.path} exited with {rc}",
                    hint="the partial overlay is discarded on the next sync",
                )

    def kill_writer(self) -> None:
        if self.writer is not None:
            self.writer.kill()
            self.writer = None

    def seal(self) -> Point:
        """Flush + stop the writer, check the image, make it read-only, publish it."""
        self.stop_writer()
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())
        info = check_image(self.path)
        final = self.chain.dir / f"{self.name}.qcow2"
        os.chmod(self.path, 0o444)
        os.replace(self.path, final)
        _fsync_dir(self.chain.dir)
        now = time.time()
        meta = json.loads(self.meta_path.read_text())
        point = Point(
            name=self.name,
            file=final.name,
            snapshot_id=self.snapshot_id,
            size=self.size,
            created_at=meta.get("created_at", now),
            sealed_at=now,
            parent=self.parent.name if self.parent else None,
            check={
                k: info.get(k)
                for k in ("exit", "leaks", "corruptions", "allocated-clusters", "image-end-offset")
            },
        )
        points = self.chain.points()
        points.append(point)
        self.chain._save(points)
        with contextlib.suppress(FileNotFoundError):
            self.meta_path.unlink()
        return point

    def discard(self) -> None:
        self.kill_writer()
        for p in (self.path, self.meta_path):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        _fsync_dir(self.chain.dir)


class DiskChain:
    """The chain of one disk. Not thread-safe: the daemon runs one job per machine."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.manifest = self.dir / "chain.json"

    # -- listing -------------------------------------------------------------------------

    def points(self) -> list[Point]:
        if not self.manifest.exists():
            return []
        data = json.loads(self.manifest.read_text())
        return [Point(**p) for p in data["points"]]

    def sealed(self) -> list[Point]:
        return [p for p in self.points() if p.state == "sealed"]

    def newest(self) -> Point | None:
        pts = self.points()
        return pts[-1] if pts else None

    def path_of(self, point: Point | str) -> Path:
        name = point if isinstance(point, str) else point.name
        for p in self.points():
            if p.name == name:
                return self.dir / p.file
        raise ChainError(
            f"no restore point {name} in {self.dir}",
            hint="list restore points with: ferryman restore-points list",
        )

    def _save(self, points: list[Point]) -> None:
        _write_atomic(
            self.manifest,
            json.dumps({"version": 1, "points": [asdict(p) for p in points]}, indent=1),
        )

    # -- writing a new point -------------------------------------------------------------

    def partial(self) -> Overlay | None:
        """The partial overlay left by an interrupted sync, if any."""
        metas = sorted(self.dir.glob("*.partial.json"))
        if not metas:
            return None
        meta = json.loads(metas[0].read_text())
        newest = self.newest()
        ov = Overlay(self, meta["name"], meta["snapshot_id"], meta["size"], newest)
        if not ov.path.exists() or (meta.get("parent") != (newest.name if newest else None)):
            ov.discard()
            return None
        return ov

    def begin(self, name: str, snapshot_id: str, size: int) -> Overlay:
        """Create the overlay for a new point over the newest sealed one.

        An interrupted sync of the same snapshot is resumed (its overlay is returned as is);
        a partial of another snapshot is discarded, never mixed (reliability row 20)."""
        if not NAME_RE.match(name):
            raise ChainError(
                f"bad restore point name {name!r}", hint="letters, digits, '.', '_' and '-' only"
            )
        old = self.partial()
        if old is not None:
            if old.snapshot_id == snapshot_id and old.name == name and old.size == size:
                log.info("resuming partial overlay %s (snapshot %s)", old.path, snapshot_id)
                old.resumed = True
                return old
            log.warning(
                "discarding partial overlay %s of snapshot %s (now %s)",
                old.path,
                old.snapshot_id,
                snapshot_id,
            )
            old.discard()
        if any(p.name == name for p in self.points()):
            raise ChainError(
                f"restore point {name} already exists in {self.dir}",
                hint="use a new name for each sync",
            )
        parent = self.newest()
        if parent is not None and parent.size != size:
            raise ChainError(
                f"disk size changed from {parent.size} to {size} bytes since {parent.name}",
                hint="resizing a protected disk needs a full resync into a new chain",
            )
        ov = Overlay(self, name, snapshot_id, size, parent)
        _write_atomic(
            ov.meta_path,
            json.dumps(
                {
                    "name": name,
                    "snapshot_id": snapshot_id,
                    "size": size,
                    "parent": parent.name if parent else None,
                    "created_at": time.time(),
                }
            ),
        )
        args = ["create", "-q", "-f", "qcow2", "-o", "cluster_size=65536"]
        if parent is not None:
            args += ["-b", parent.file, "-F", "qcow2"]
        args += [str(ov.path), str(size)]
        r = qemu_img(*args)
        if r.returncode != 0:
            ov.discard()
            raise WriterError(
                f"cannot create {ov.path}: {r.stderr.strip()}",
                hint="check free space and permissions of the volume store",
            )
        return ov

    def resume(self, snapshot_id: str) -> Overlay:
        """The partial overlay of exactly this snapshot; refuses any other."""
        ov = self.partial()
        if ov is None:
            raise ResumeRefused(
                f"no partial restore point to resume in {self.dir}", hint="start a new sync"
            )
        if ov.snapshot_id != snapshot_id:
            raise ResumeRefused(
                f"the partial restore point in {self.dir} belongs to source snapshot "
                f"{ov.snapshot_id}, not {snapshot_id}",
                hint="data of two snapshots is never mixed: the sync restarts from the last "
                "restore point",
            )
        return ov

    # -- readers -------------------------------------------------------------------------

    def _readers_dir(self, point: str) -> Path:
        return self.dir / "readers" / point

    @contextlib.contextmanager
    def reading(self, point: str, holder: str) -> Iterator[Path]:
        """Hold a point open for a process-lifetime reader (verify, export)."""
        rid = self.add_reader(point, holder, pid=os.getpid())
        try:
            yield self.path_of(point)
        finally:
            self.remove_reader(point, rid)

    def add_reader(self, point: str, holder: str, pid: int | None = None) -> str:
        """Register a reader. With pid, it vanishes when that process dies; without
        (a test-run overlay file on disk), it stays until ``remove_reader``."""
        self.path_of(point)
        d = self._readers_dir(point)
        d.mkdir(parents=True, exist_ok=True)
        rid = uuid.uuid4().hex[:12]
        _write_atomic(
            d / f"{rid}.json", json.dumps({"holder": holder, "pid": pid, "since": time.time()})
        )
        return rid

    def remove_reader(self, point: str, rid: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self._readers_dir(point) / f"{rid}.json").unlink()

    def readers(self, point: str) -> list[dict[str, Any]]:
        out = []
        d = self._readers_dir(point)
        for f in sorted(d.glob("*.json")) if d.exists() else []:
            try:
                r = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            pid = r.get("pid")
            if pid is not None and not _alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
                continue
            r["id"] = f.stem
            out.append(r)
        return out

    # -- retention -----------------------------------------------------------------------

    def merge_oldest(self) -> Point:
        """Drop the oldest point by folding its child into it.

        base <- rp1 <- rp2 becomes base' <- rp2 where base' holds rp1's data (the file of
        the old base, now listed as rp1): ``qemu-img commit rp1`` writes only rp1's delta.
        Refused while anything reads base or rp1. Crash-safe: the point is marked
        'merging' first; ``recover()`` finishes the steps, each of which is idempotent.
        Returns the dropped point."""
        pts = self.points()
        if len(pts) < 2:
            raise ChainError(
                f"{self.dir}: nothing to merge, {len(pts)} point(s)",
                hint="retention keeps at least one restore point",
            )
        base, child = pts[0], pts[1]
        for p in (base, child):
            rs = self.readers(p.name)
            if rs:
                raise ReaderBusy(
                    f"restore point {p.name} is in use by {', '.join(r['holder'] for r in rs)}",
                    hint="end the test run or verify that uses it, then apply retention again",
                )
        if base.state != "merging":
            base.state = "merging"
            self._save(pts)
        self._finish_merge()
        return base

    def _finish_merge(self) -> None:
        pts = self.points()
        base, child = pts[0], pts[1]
        assert base.state == "merging"
        base_path, child_path = self.dir / base.file, self.dir / child.file
        if child_path.exists() and child.file != base.file:
            # Sealed files are read-only on disk; retention is the one writer of the base.
            os.chmod(base_path, 0o644)
            os.chmod(child_path, 0o644)
            r = qemu_img("commit", "-q", "-f", "qcow2", "-d", str(child_path))
            if r.returncode != 0:
                os.chmod(base_path, 0o444)
                raise ChainError(
                    f"qemu-img commit {child_path} failed: {r.stderr.strip()}",
                    hint="the chain is unchanged for readers; retry retention",
                )
            with open(base_path, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(base_path, 0o444)
            if len(pts) > 2:
                gc = pts[2]
                gc_path = self.dir / gc.file
                os.chmod(gc_path, 0o644)
                r = qemu_img(
                    "rebase", "-u", "-f", "qcow2", "-b", base.file, "-F", "qcow2", str(gc_path)
                )
                os.chmod(gc_path, 0o444)
                if r.returncode != 0:
                    raise ChainError(
                        f"qemu-img rebase {gc_path} failed: {r.stderr.strip()}",
                        hint="retry retention; the merge resumes",
                    )
        merged = Point(**{**asdict(child), "file": base.file, "parent": None, "state": "sealed"})
        rest = pts[2:]
        if rest:
            rest[0].parent = merged.name
        self._save([merged, *rest])
        if child_path.exists() and child.file != base.file:
            child_path.unlink()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self._readers_dir(base.name))
        _fsync_dir(self.dir)

    def delete_newest(self) -> Point:
        """Remove the newest point (nothing is backed by it)."""
        pts = self.points()
        if not pts:
            raise ChainError(f"{self.dir}: no restore points", hint="nothing to delete")
        p = pts[-1]
        if self.readers(p.name):
            raise ReaderBusy(f"restore point {p.name} is in use", hint="end what reads it first")
        self._save(pts[:-1])
        with contextlib.suppress(FileNotFoundError):
            (self.dir / p.file).unlink()
        return p

    def recover(self) -> list[str]:
        """After a crash: finish an interrupted merge, remove files no point lists."""
        done = []
        pts = self.points()
        if pts and pts[0].state == "merging" and len(pts) > 1:
            self._finish_merge()
            done.append(f"finished merge of {pts[0].name}")
        keep = {p.file for p in self.points()} | {"chain.json"}
        partial = self.partial()
        if partial is not None:
            keep |= {partial.path.name, partial.meta_path.name}
        for f in self.dir.iterdir():
            if (
                f.is_file()
                and f.name not in keep
                and (f.suffix == ".qcow2" or f.name.endswith((".partial", ".tmp")))
            ):
                f.unlink()
                done.append(f"removed debris {f.name}")
        return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
