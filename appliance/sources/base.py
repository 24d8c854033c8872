"""The one small interface every source speaks.

A source adapter turns "sync machine M" into a *sync session*: one frozen source snapshot,
and per disk an NBD export to read, the extents to copy and, after the restore point is
sealed, a commit token to persist (checkpoint name, changeId, hash manifest, ...).

Order that keeps data safe (design.md, data path): copy -> flush target -> seal restore point
-> persist ``session.token`` -> ``session.release()`` (drop the source snapshot / end the
backup job). ``release`` and ``abort`` are always called, also on failure, so a source is never
left with a snapshot or a running backup job.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class Consistency(enum.StrEnum):
    QUIESCED = "quiesced"  # guest agent / VMware tools froze the filesystems
    CRASH_CONSISTENT = "crash-consistent"  # one instant for all disks, no freeze
    CRASH_INCONSISTENT = "crash-inconsistent"  # copied live in passes (agent without LVM)


@dataclass(frozen=True)
class Extent:
    offset: int
    length: int
    zero: bool  # True: the source reads as zeroes here; write zeroes, never data

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class DiskInfo:
    key: str  # stable id of the disk inside its machine: "vda", "2000", "sda"
    size: int  # bytes
    label: str = ""  # operator-facing: datastore path, device, file
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MachineInfo:
    """What discovery reports; stored in the machines and disks tables."""

    ref: str  # source-side identity (libvirt UUID, vSphere MoRef/instanceUuid, host name)
    name: str
    power_state: str  # "running" | "stopped" | "paused" | "unknown"
    disks: list[DiskInfo]
    guest_os: str = ""
    cpus: int = 0
    memory_mib: int = 0
    firmware: str = ""  # "bios" | "efi"
    nics: list[dict[str, Any]] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class DiskExport(Protocol):
    """One disk of one source snapshot, readable over NBD."""

    disk: DiskInfo
    nbd_uri: str  # e.g. nbd+unix:///vda?socket=/run/ferryman/backup/x.sock
    # "dirty": extents() are exactly what changed (plus zero holes);
    # "full": extents() cover the whole allocated disk;
    # "compare": read everything, write only blocks whose hash differs from the previous point.
    mode: str

    def extents(self) -> Iterator[Extent]:
        """Extents to copy, in ascending order, non-overlapping."""
        ...


class SyncSession(Protocol):
    snapshot_id: str  # identity of the frozen source state; a resume must match it
    consistency: Consistency
    disks: list[DiskExport]
    full: bool  # True when this is (or fell back to) a full copy
    reason: str  # why full, when it fell back ("checkpoint missing on source", ...)

    def token(self) -> dict[str, Any]:
        """Commit token to persist AFTER the restore point is sealed."""
        ...

    def release(self) -> None:
        """Drop the source snapshot / end the backup job. Idempotent; always called."""
        ...


class SourceAdapter(Protocol):
    kind: str  # "libvirt" | "nbd" | "vsphere" | "linux-agent"

    def test(self) -> None:
        """Reach the source and authenticate; raise a FerrymanError naming the fix."""
        ...

    def discover(self) -> list[MachineInfo]: ...

    def open_session(self, machine_ref: str, previous_token: dict[str, Any] | None) -> SyncSession:
        """Freeze the source and expose its disks. previous_token None -> full copy."""
        ...
