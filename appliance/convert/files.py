"""A guest's file tree seen through one small interface.

The converter's decisions (which fstab lines to rewrite, which network files carry MAC
bindings, what the grub defaults become) are plain text edits. Written against this interface
they run on a libguestfs handle in production and on a directory in unit tests, so the RHEL and
SUSE paths, which cannot be booted here, are still tested on real file trees.
"""

from __future__ import annotations

import fnmatch
import posixpath
from pathlib import Path
from typing import Any, Protocol


class GuestFiles(Protocol):
    def exists(self, path: str) -> bool: ...
    def is_dir(self, path: str) -> bool: ...
    def read(self, path: str) -> str: ...
    def write(self, path: str, text: str) -> None: ...
    def remove(self, path: str) -> None: ...
    def listdir(self, path: str) -> list[str]: ...
    def readlink(self, path: str) -> str | None: ...
    def chmod(self, path: str, mode: int) -> None: ...
    def chown(self, path: str, uid: int, gid: int) -> None: ...


def glob(files: GuestFiles, pattern: str) -> list[str]:
    """Glob with one wildcard level per path component (enough for /etc/... patterns)."""
    parts = [p for p in pattern.split("/") if p]
    paths = ["/"]
    for part in parts:
        nxt: list[str] = []
        for base in paths:
            if any(c in part for c in "*?["):
                if not files.is_dir(base):
                    continue
                nxt += [
                    posixpath.join(base, n)
                    for n in sorted(files.listdir(base))
                    if fnmatch.fnmatch(n, part)
                ]
            else:
                cand = posixpath.join(base, part)
                if files.exists(cand) or files.readlink(cand) is not None:
                    nxt.append(cand)
        paths = nxt
    return paths


class DirFiles:
    """A guest tree unpacked in a host directory (unit tests, or a mounted copy)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.owners: dict[str, tuple[int, int]] = {}

    def _p(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    def exists(self, path: str) -> bool:
        return self._p(path).exists()

    def is_dir(self, path: str) -> bool:
        return self._p(path).is_dir()

    def read(self, path: str) -> str:
        return self._p(path).read_text(errors="replace")

    def write(self, path: str, text: str) -> None:
        p = self._p(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    def remove(self, path: str) -> None:
        self._p(path).unlink(missing_ok=True)

    def listdir(self, path: str) -> list[str]:
        p = self._p(path)
        return sorted(x.name for x in p.iterdir()) if p.is_dir() else []

    def readlink(self, path: str) -> str | None:
        p = self._p(path)
        return str(p.readlink()) if p.is_symlink() else None

    def chmod(self, path: str, mode: int) -> None:
        self._p(path).chmod(mode)

    def chown(self, path: str, uid: int, gid: int) -> None:
        # Unit tests run on trees owned by the test user; ownership is recorded, not applied.
        self.owners[path] = (uid, gid)


class GuestfsFiles:
    """The mounted guest of a libguestfs handle. Paths are guest paths."""

    def __init__(self, g: Any) -> None:
        self.g = g

    def exists(self, path: str) -> bool:
        return bool(self.g.exists(path))

    def is_dir(self, path: str) -> bool:
        return bool(self.g.is_dir(path, followsymlinks=True))

    def read(self, path: str) -> str:
        data: bytes = self.g.read_file(path)
        return data.decode("utf-8", errors="replace")

    def write(self, path: str, text: str) -> None:
        parent = posixpath.dirname(path)
        if not self.g.is_dir(parent):
            self.g.mkdir_p(parent)
        self.g.write(path, text.encode())

    def remove(self, path: str) -> None:
        self.g.rm_f(path)

    def listdir(self, path: str) -> list[str]:
        if not self.g.is_dir(path, followsymlinks=True):
            return []
        return sorted(self.g.ls(path))

    def readlink(self, path: str) -> str | None:
        if not self.g.is_symlink(path):
            return None
        return str(self.g.readlink(path))

    def chmod(self, path: str, mode: int) -> None:
        self.g.chmod(mode, path)

    def chown(self, path: str, uid: int, gid: int) -> None:
        self.g.chown(uid, gid, path)
