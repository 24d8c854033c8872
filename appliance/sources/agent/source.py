"""The "linux-agent" source: physical servers and foreign VMs, reached over SSH.

A session, end to end (docs/agent.md):

1. SSH master connection with the pinned host key; the helper (``helper.py``, Python 3.6
   stdlib only) is copied into a private temporary directory on the server.
2. Snapshots: every replicated LV gets an LVM snapshot; its filesystem is frozen for the
   instant of the snapshot by device-mapper's suspend (the kernel's own fsfreeze; an
   explicit fsfreeze first makes the suspend fail on kernels before 6.8, see helper.py).
   Snapshots are tagged ``ferryman`` so a later session finds and removes left-overs.
3. Block hashes: the helper hashes every 1 MiB block of each snapshot ON THE SERVER. Blocks
   whose hash equals the last restore point's manifest never cross the wire; zero blocks
   are written as zero requests. Only differing blocks are offered to the copier as extents.
   The server's manifest becomes the new point's manifest (``export.manifest``), and the
   adapter keeps a copy keyed by its digest for the next incremental.
4. Data: each snapshot is an NBD export on stdin/stdout of an SSH channel (nbdkit -s,
   qemu-nbd relayed by the helper, or the helper's own read-only NBD server), bridged to a
   local unix socket: the copier sees an ordinary ``nbd+unix://`` URI and reconnects to it
   when the link drops; the server opens no port.
5. ``release``: channels closed, snapshots removed, helper removed, master stopped; always,
   also after a failure.

Devices not on LVM can be listed as ``live_devices``: copied live (no snapshot), restore
points labelled crash-inconsistent, passes converge; the last pass at cutover, with the
services stopped, is consistent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import select
import shutil
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from appliance.datapath.hashing import ALGO, BLOCK_SIZE, HashManifest, _zero_hash
from appliance.errors import FerrymanError
from appliance.sources.agent.errors import (
    AgentError,
    AgentSnapshotError,
    AgentSnapshotFull,
    AgentUnsupported,
)
from appliance.sources.agent.ssh import HostKey, NbdForwarder, Ssh, scan_host_key
from appliance.sources.base import Consistency, DiskInfo, Extent, MachineInfo

log = logging.getLogger(__name__)

TAG = "ferryman"  # LVM tag on every snapshot the agent makes; nothing else carries it
HELPER_NAME = "ferryman_agent.py"
REMOTE_DIR_RE = re.compile(r"^/tmp/ferryman-agent\.[A-Za-z0-9]{8}$")
DEFAULT_SNAPSHOT_SIZE = "20%ORIGIN"  # copy-on-write room: writes during one sync
FREEZE_HOLD_START_S = 180.0  # sync + fsfreeze of the live filesystems on a busy server
WATCH_INTERVAL_S = 3.0  # how often a running sync checks its snapshots' fill level
HASH_TIMEOUT_S = 6 * 3600.0  # reading a large disk on a slow server takes long
KEEP_MANIFESTS = 3  # per disk in the adapter's own cache
REUSE_MAX_USED = 50.0  # % of a left-over snapshot's room used: fuller ones are not resumed
UNKNOWN_HASH = b"\xff" * 32  # live mode: copied, content unknown; never equals a sha256
SERVERS = ("auto", "nbdkit", "qemu-nbd", "builtin")


def _helper_source() -> bytes:
    return resources.files("appliance.sources.agent").joinpath("helper.py").read_bytes()


def _key_of(vg_lv: str) -> str:
    vg, lv = vg_lv.split("/", 1)
    return f"{vg}-{lv}"


class RemoteHelper:
    """The helper on the server: copied in, called step by step, removed."""

    def __init__(self, ssh: Ssh) -> None:
        self.ssh = ssh
        self.dir: str | None = None
        self.sudo: list[str] = []

    def upload(self) -> None:
        script = (
            "command -v python3 >/dev/null 2>&1 || { echo ferryman-no-python3 >&2; exit 3; }; "
            "umask 077; d=$(mktemp -d /tmp/ferryman-agent.XXXXXXXX) || exit 4; "
            f'cat > "$d/{HELPER_NAME}" && echo "$d $(id -u)"'
        )
        r = self.ssh.run(["sh", "-c", script], input=_helper_source(), timeout=120)
        err = r.stderr.decode(errors="replace")
        if r.returncode == 3:
            raise AgentUnsupported(
                f"{self.ssh.target} has no python3",
                hint="install python3 (3.6 or newer) on the server; docs/agent.md lists "
                "what the helper needs",
            )
        parts = r.stdout.decode().split()
        if r.returncode != 0 or len(parts) != 2 or not REMOTE_DIR_RE.match(parts[0]):
            raise AgentError(
                f"copying the helper to {self.ssh.target} failed: {err.strip() or r.stdout!r}",
                hint="the user needs a writable /tmp on the server",
            )
        self.dir = parts[0]
        self.sudo = [] if parts[1] == "0" else ["sudo", "-n"]

    def argv(self, *args: str) -> list[str]:
        assert self.dir is not None, "upload() first"
        return [*self.sudo, "python3", f"{self.dir}/{HELPER_NAME}", *args]

    def call(self, *args: str, timeout: float = 300.0) -> dict[str, Any]:
        r = self.ssh.run(self.argv(*args), timeout=timeout)
        if r.returncode != 0:
            msg = r.stderr.decode(errors="replace").strip().splitlines()
            raise AgentError(
                f"{args[0]} on {self.ssh.target} failed: {msg[-1] if msg else r.returncode}",
                hint="see the message; the server's own logs may say more",
            )
        doc: dict[str, Any] = json.loads(r.stdout)
        return doc

    def hashes(
        self, dev: str, block: int, only: list[int] | None = None
    ) -> tuple[int, list[bytes]]:
        """(size, sha256 per block) of ``dev``; with ``only``: of those block numbers."""
        if only is None:
            r = self.ssh.run(self.argv("hash", dev, str(block)), timeout=HASH_TIMEOUT_S)
        else:
            r = self.ssh.run(
                self.argv("hash", dev, str(block), "-"),
                input="\n".join(map(str, only)).encode(),
                timeout=HASH_TIMEOUT_S,
            )
        if r.returncode != 0 or len(r.stdout) < 8:
            raise AgentError(
                f"hashing {dev} on {self.ssh.target} failed: "
                f"{r.stderr.decode(errors='replace').strip()}",
                hint="the device may have gone away; sync again",
            )
        (size,) = struct.unpack(">Q", r.stdout[:8])
        raw = r.stdout[8:]
        n = (size + block - 1) // block if only is None else len(only)
        if len(raw) != 32 * n:
            raise AgentError(
                f"hashing {dev} on {self.ssh.target} returned {len(raw) // 32} of {n} hashes",
                hint="the link dropped while hashing; sync again",
            )
        return size, [raw[i : i + 32] for i in range(0, len(raw), 32)]

    def remove(self) -> None:
        if self.dir is None:
            return
        d, self.dir = self.dir, None
        assert REMOTE_DIR_RE.match(d)
        self.ssh.run(["rm", "-rf", "--", d], timeout=60)


def extents_from_hashes(
    hashes: list[bytes], size: int, block: int, previous: HashManifest | None
) -> list[Extent]:
    """Blocks to copy: zero blocks as zero extents, data blocks that differ from
    ``previous`` (all of them when there is none), adjacent blocks merged."""
    out: list[Extent] = []
    for i, h in enumerate(hashes):
        n = min(block, size - i * block)
        if previous is not None and previous.hashes[i] == h:
            continue
        zero = h == _zero_hash(n)
        off = i * block
        last = out[-1] if out else None
        if last is not None and last.end == off and last.zero == zero:
            out[-1] = Extent(last.offset, last.length + n, zero)
        else:
            out.append(Extent(off, n, zero))
    return out


@dataclass
class AgentDiskExport:
    disk: DiskInfo
    nbd_uri: str
    mode: str  # "full" | "dirty"
    # The server-side hash manifest of this snapshot: the engine stores it with the point.
    # None in live mode: data copied after hashing may differ from the hash (see own_manifest).
    manifest: HashManifest | None
    planned: list[Extent]
    # What the adapter keeps for its next incremental: the manifest, or in live mode the
    # manifest with every copied data block marked unknown, so the next pass copies it again.
    own_manifest: HashManifest
    before: list[bytes] = field(default_factory=list)  # live mode: hashes before the copy
    settled: bool = False
    changed_during_copy: int = 0  # live mode: copied blocks that changed while copying
    origin: str = ""  # VG/LV or device
    snapshot: str = ""  # VG/SNAP, "" in live mode
    notes: list[str] = field(default_factory=list)

    def extents(self) -> Iterator[Extent]:
        yield from self.planned

    @property
    def changed_bytes(self) -> int:
        return sum(e.length for e in self.planned if not e.zero)


class FreezeHold:
    """The final live pass at cutover: the filesystems of the live devices stay frozen for
    as long as one SSH channel runs ``helper.py freeze-hold``. Closing its stdin thaws them;
    so does a dropped link (sshd ends the channel), so a lost appliance never leaves the
    server frozen."""

    def __init__(self, ssh: Ssh, argv: list[str]) -> None:
        self.ssh = ssh
        self.proc: subprocess.Popen[bytes] = ssh.popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.err = ""

    def wait_frozen(self, timeout: float = FREEZE_HOLD_START_S) -> dict[str, Any]:
        assert self.proc.stdout is not None
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if r else b""
        if not line:
            with contextlib.suppress(FerrymanError):
                self.close()
            err = self.err.strip().splitlines()
            raise AgentError(
                f"freezing the live filesystems on {self.ssh.host} failed: "
                f"{err[-1] if err else 'no answer'}",
                hint="stop the services that write to them and confirm the delta again",
            )
        doc: dict[str, Any] = json.loads(line)
        return doc

    def close(self) -> list[str]:
        """Thaw: end the channel, wait for the helper to confirm. -> the thawed mount points"""
        try:
            out, err = self.proc.communicate(timeout=120)  # closes stdin: the helper thaws
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AgentError(
                f"the filesystems frozen on {self.ssh.host} did not confirm the thaw",
                hint="check on the server: fsfreeze -u MOUNTPOINT (the helper thaws by itself "
                "when its channel ends)",
            ) from None
        self.err = err.decode(errors="replace")
        for ln in out.splitlines():
            with contextlib.suppress(ValueError):
                return list(json.loads(ln).get("thawed", []))
        return []


class AgentSession:
    def __init__(self, source: LinuxAgentSource, ssh: Ssh, helper: RemoteHelper) -> None:
        self.source = source
        self.ssh = ssh
        self.helper = helper
        self.snapshot_id = ""
        self.consistency = Consistency.CRASH_CONSISTENT
        self.disks: list[AgentDiskExport] = []  # type: ignore[assignment]
        self.full = True
        self.reason = ""
        self.machine_id = ""
        self.snapshots: list[str] = []
        self.freeze: dict[str, Any] = {}
        self.notes: list[str] = []
        self.timings: dict[str, float] = {}  # seconds per step of open_session
        self.resumed_snapshot = False  # True: snapshots of an interrupted earlier session
        self.forwarders: list[NbdForwarder] = []
        self.hold: FreezeHold | None = None  # final live pass: frozen until release
        self.final_pass = False
        self._released = False
        self._failure: AgentError | None = None
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # -- engine interface ------------------------------------------------------------------

    def token(self) -> dict[str, Any]:
        """Persisted after the point is sealed: the manifests are kept for the next sync."""
        for d in self.disks:
            if not d.snapshot:
                self._settle_live(d)
            self.source.keep_manifest(self.machine_id, d.disk.key, d.own_manifest)
        return {
            "kind": "linux-agent",
            "machine_id": self.machine_id,
            "snapshot_id": self.snapshot_id,
            "disks": {
                d.disk.key: {
                    "size": d.disk.size,
                    "origin": d.origin,
                    "origin_uuid": d.disk.details.get("origin_uuid", ""),
                    "manifest": d.own_manifest.digest(),
                    "block_size": d.own_manifest.block_size,
                    "mode": d.mode,
                }
                for d in self.disks
            },
        }

    def _settle_live(self, d: AgentDiskExport) -> None:
        """Live mode: a copied block is known only if the server still shows the hash it had
        before the copy (it did not change while being read). Blocks that changed meanwhile
        stay unknown, so the next pass copies them again: passes converge to what is
        written during one pass. (A block changed and changed back within one pass is not
        caught; the final pass at cutover should run with verification.)"""
        blocks = sorted(
            {
                i
                for e in d.planned
                if not e.zero
                for i in range(e.offset // BLOCK_SIZE, -(-e.end // BLOCK_SIZE))
            }
        )
        if not blocks or d.settled:
            return
        _, after = self.helper.hashes(d.origin, BLOCK_SIZE, only=blocks)
        for i, h in zip(blocks, after, strict=True):
            d.own_manifest.hashes[i] = h if h == d.before[i] else UNKNOWN_HASH
        d.settled = True
        d.changed_during_copy = sum(
            1 for i, h in zip(blocks, after, strict=True) if h != d.before[i]
        )

    def failure(self) -> AgentError | None:
        """The source-side reason a copy failed, if there is one (snapshot overflowed)."""
        if self._failure is None and self.snapshots and not self._released:
            with contextlib.suppress(FerrymanError):
                self._check_snapshots()
        return self._failure

    def watch(self, cancel: threading.Event, interval: float = WATCH_INTERVAL_S) -> None:
        """Check the snapshots' fill level while copying; set ``cancel`` when one overflows,
        so the sync stops at once instead of retrying reads of a dead snapshot."""
        if not self.snapshots or self._watcher is not None:
            return

        def loop() -> None:
            while not self._watch_stop.wait(interval):
                try:
                    if self._check_snapshots() is not None:
                        cancel.set()
                        return
                except FerrymanError as e:
                    log.info("snapshot watch on %s: %s", self.ssh.target, e)

        self._watcher = threading.Thread(target=loop, name="agent-snapshot-watch", daemon=True)
        self._watcher.start()

    def _check_snapshots(self) -> AgentError | None:
        st = self.helper.call("status", *self.snapshots, timeout=60)
        for s in st["snapshots"]:
            if s.get("exists") and (s.get("invalid") or s.get("used_percent", 0) >= 100.0):
                d = next((x for x in self.disks if x.snapshot == s["snapshot"]), None)
                origin = d.origin if d else s["snapshot"]
                self._failure = AgentSnapshotFull(
                    f"the LVM snapshot of {origin} on {self.ssh.host} ran out of copy-on-write "
                    f"space ({self.source.snapshot_size}) during the sync and became invalid; "
                    f"{origin} itself is untouched and the snapshot is removed",
                    hint="give the snapshot more room (snapshot_size, e.g. 50%ORIGIN, needs "
                    "free extents in the volume group) or sync when the server writes less",
                )
                return self._failure
        return None

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(30)
        errors: list[str] = []
        for f in self.forwarders:
            try:
                f.close()
            except Exception as e:  # keep going: the snapshot must still be removed
                errors.append(f"closing {f.sock.name}: {e}")
        self.forwarders.clear()
        if self.hold is not None:
            try:
                self.freeze["thawed"] = self.hold.close()
            except FerrymanError as e:
                errors.append(str(e))
            self.hold = None
        try:
            if self.helper.dir is not None:
                # One call removes the snapshots and the helper: each costs seconds on a
                # slow server.
                out = self.helper.call("finish", *self.snapshots, timeout=120)
                for r in out["removed"]:
                    if not r["ok"]:
                        errors.append(f"lvremove {r['snapshot']}: {r['error']}")
                self.snapshots = []
                if out.get("purged"):
                    self.helper.dir = None
            self.helper.remove()
        except FerrymanError as e:
            errors.append(str(e))
        finally:
            self.ssh.close()
            shutil.rmtree(self.ssh.work_dir, ignore_errors=True)
        if errors:
            raise AgentSnapshotError(
                f"cleaning up on {self.ssh.host} failed: {'; '.join(errors)}",
                hint="the next sync removes left-over ferryman snapshots; or run "
                f"lvremove on the server for LVs tagged @{TAG}",
            )


class LinuxAgentSource:
    """config (kind "linux-agent"):

    host, port (22), user ("root"; others need passwordless sudo), identity (a 0600 key
    file Path, or a callable returning the private key from the vault), host_key
    ("ssh-ed25519 AAAA..." pinned at first contact; None: pinned now and handed to
    ``on_host_key``), volumes (["vg0/root", ...]; default every LV that is not a snapshot),
    live_devices (["/dev/sdb", ...]: copied live, crash-inconsistent), snapshot_size
    ("20%ORIGIN" or bytes), nbd_server ("auto" | "nbdkit" | "qemu-nbd" | "builtin"),
    run_dir (sockets, per-session key copies), state_dir (the manifests of the last points).
    """

    kind = "linux-agent"

    def __init__(
        self,
        *,
        host: str,
        identity: Path | Callable[[], str],
        run_dir: Path,
        state_dir: Path,
        port: int = 22,
        user: str = "root",
        host_key: str | None = None,
        on_host_key: Callable[[HostKey], None] | None = None,
        name: str = "",
        volumes: list[str] | None = None,
        live_devices: list[str] | None = None,
        snapshot_size: str | int = DEFAULT_SNAPSHOT_SIZE,
        nbd_server: str = "auto",
        connect_timeout: float = 20.0,
    ) -> None:
        if nbd_server not in SERVERS:
            raise AgentError(
                f"nbd_server '{nbd_server}' is unknown", hint=f"use one of {', '.join(SERVERS)}"
            )
        self.host, self.port, self.user = host, int(port), user
        self.identity = identity
        self.run_dir = run_dir
        self.state_dir = state_dir
        self.host_key = HostKey.parse(host_key) if host_key else None
        self.on_host_key = on_host_key
        self.name = name or host
        self.volumes = None if volumes is None else list(volumes)
        self.live_devices = list(live_devices or [])
        self.snapshot_size = str(snapshot_size)
        if not re.fullmatch(r"\d+[KMGT]?|\d{1,3}%(ORIGIN|FREE|VG)", self.snapshot_size):
            raise AgentError(
                f"snapshot_size '{snapshot_size}' is not a size nor N%ORIGIN",
                hint="e.g. 20%ORIGIN, 2G or 1073741824 (bytes)",
            )
        self.nbd_server = nbd_server
        self.connect_timeout = connect_timeout

    # -- connection ------------------------------------------------------------------------

    def _pinned(self) -> HostKey:
        if self.host_key is None:
            key = scan_host_key(self.host, self.port)
            log.warning(
                "pinning the SSH host key of %s:%d at first contact: %s",
                self.host,
                self.port,
                key.fingerprint,
            )
            self.host_key = key
            if self.on_host_key is not None:
                self.on_host_key(key)
        return self.host_key

    def _ssh(self) -> Ssh:
        work = self.run_dir / f"agent-{uuid.uuid4().hex[:12]}"
        return Ssh(
            host=self.host,
            port=self.port,
            user=self.user,
            host_key=self._pinned(),
            identity=self.identity,
            work_dir=work,
            connect_timeout=self.connect_timeout,
        )

    @contextlib.contextmanager
    def _helper(self) -> Iterator[RemoteHelper]:
        ssh = self._ssh()
        helper = RemoteHelper(ssh)
        try:
            ssh.connect()
            helper.upload()
            yield helper
        finally:
            try:
                helper.remove()
            except FerrymanError as e:
                log.warning("removing the helper from %s: %s", self.host, e)
            ssh.close()
            shutil.rmtree(ssh.work_dir, ignore_errors=True)

    # -- SourceAdapter ---------------------------------------------------------------------

    def test(self) -> None:
        with self._helper() as h:
            self._check(h)

    def _check(self, h: RemoteHelper, info: dict[str, Any] | None = None) -> dict[str, Any]:
        info = info if info is not None else h.call("check")
        if tuple(info["python"][:2]) < (3, 6):
            raise AgentUnsupported(
                f"{self.host} has python {'.'.join(map(str, info['python']))}",
                hint="the helper needs python 3.6 or newer on the server",
            )
        if info["uid"] != 0:
            raise AgentUnsupported(
                f"{self.user} on {self.host} is not root and sudo -n did not make it root",
                hint=f"log in as root, or allow {self.user} passwordless sudo",
            )
        if self.volumes != [] and not info["tools"].get("lvcreate"):
            raise AgentUnsupported(
                f"{self.host} has no lvcreate: no LVM snapshots possible",
                hint="install lvm2, or list the disks as live_devices (crash-inconsistent)",
            )
        return info

    def discover(self) -> list[MachineInfo]:
        with self._helper() as h:
            self._check(h)
            inv = h.call("inventory", timeout=120)
        return [self._machine(inv)]

    def _machine(self, inv: dict[str, Any]) -> MachineInfo:
        lvs = {f"{r['vg_name']}/{r['lv_name']}": r for r in inv["lvm"]["lvs"]}
        disks = []
        for vl in self._selected_volumes(inv):
            r = lvs[vl]
            disks.append(
                DiskInfo(
                    key=_key_of(vl),
                    size=int(r["lv_size"]),
                    label=f"LV {vl}",
                    details={"origin": vl, "origin_uuid": r["lv_uuid"], "mode": "snapshot"},
                )
            )
        for dev in self.live_devices:
            size = _device_size(inv, dev)
            disks.append(
                DiskInfo(
                    key=Path(dev).name,
                    size=size,
                    label=dev,
                    details={"origin": dev, "mode": "live"},
                )
            )
        nics = [
            {"name": i["name"], "mac": i["mac"], "addresses": i["addresses"]}
            for i in inv["network"]["interfaces"]
            if i.get("name") != "lo"
        ]
        return MachineInfo(
            ref=inv["machine_id"],
            name=self.name if self.name != self.host else inv["hostname"],
            power_state="running",
            disks=disks,
            guest_os=inv["os"].get("PRETTY_NAME", ""),
            cpus=int(inv["cpus"]),
            memory_mib=int(inv["memory_mib"]),
            firmware=inv["firmware"],
            nics=nics,
            details=inv,
        )

    def _selected_volumes(self, inv: dict[str, Any]) -> list[str]:
        rows = inv["lvm"]["lvs"]
        plain = [
            f"{r['vg_name']}/{r['lv_name']}"
            for r in rows
            if not r.get("origin")
            and TAG not in (r.get("lv_tags") or "")
            and r.get("lv_attr", "-")[:1] in ("-", "o")
            and not r["lv_name"].startswith("[")
        ]
        if self.volumes is None:
            return plain
        for v in self.volumes:
            if v not in plain:
                raise AgentError(
                    f"volume {v} is not an LV on {self.host} (found: {', '.join(plain) or 'none'})",
                    hint="give volumes as VG/LV, as lvs shows them",
                )
        return list(self.volumes)

    def open_final_pass(
        self, machine_ref: str, previous_token: dict[str, Any] | None
    ) -> AgentSession:
        """The last delta at cutover, with the services stopped: LVs are snapshotted as
        always; the filesystems on live devices are frozen (fsfreeze) from before hashing
        until release, so their copy is consistent and verifiable like a snapshot's."""
        return self.open_session(machine_ref, previous_token, final_pass=True)

    def open_session(
        self,
        machine_ref: str,
        previous_token: dict[str, Any] | None,
        final_pass: bool = False,
    ) -> AgentSession:
        ssh = self._ssh()
        helper = RemoteHelper(ssh)
        session = AgentSession(self, ssh, helper)
        session.final_pass = final_pass
        try:
            self._open(session, machine_ref, previous_token)
        except BaseException:
            try:
                session.release()
            except FerrymanError as e:
                log.warning("cleaning up after a failed session on %s: %s", self.host, e)
            raise
        return session

    def _open(
        self, s: AgentSession, machine_ref: str, previous_token: dict[str, Any] | None
    ) -> None:
        t = time.monotonic()

        def step(name: str) -> None:
            nonlocal t
            now = time.monotonic()
            s.timings[name] = round(now - t, 3)
            t = now

        s.ssh.connect()
        step("connect")
        s.helper.upload()
        step("upload")
        prep = s.helper.call("prepare", TAG, timeout=180)
        step("prepare")
        info = self._check(s.helper, prep["check"])
        if machine_ref and info["machine_id"] != machine_ref:
            raise AgentError(
                f"{self.host} is machine {info['machine_id']}, not the registered {machine_ref}",
                hint="the address now leads to another server: fix the source's host",
            )
        s.machine_id = info["machine_id"]
        machine = self._machine(prep["inventory"])
        sid = uuid.uuid4().hex[:10]
        lvs = [d for d in machine.disks if d.details["mode"] == "snapshot"]
        snaps: dict[str, dict[str, Any]] = {}
        left: list[dict[str, Any]] = prep["leftovers"]
        reuse = self._reusable(left, lvs, s.machine_id, previous_token)
        if reuse is not None:
            # An earlier session of this machine copied part of these snapshots and could
            # not remove them (link down, appliance crash): same snapshot, same identity,
            # so the engine resumes its journal instead of copying again.
            sid = reuse
            snaps = {x["origin"]: x for x in left}
            s.snapshots = [x["snapshot"] for x in left]
            s.resumed_snapshot = True
            log.warning("%s: resuming from the snapshots of session %s", self.host, sid)
        elif left:
            out = s.helper.call("remove", *[x["snapshot"] for x in left], timeout=120)
            for r in out["removed"]:
                log.warning("removed left-over snapshot %s on %s", r["snapshot"], self.host)
        for p in prep["stale_helpers"]:
            log.warning("removed a stale helper directory %s on %s", p, self.host)
        if lvs and reuse is None:
            pairs = [
                f"{d.details['origin']}:{d.details['origin'].split('/')[1]}_fm{sid}" for d in lvs
            ]
            try:
                out = s.helper.call("snapshot", TAG, self.snapshot_size, *pairs, timeout=120)
            except AgentError as e:
                raise AgentSnapshotError(
                    f"snapshot of {', '.join(d.details['origin'] for d in lvs)} on "
                    f"{self.host} failed: {e.message}",
                    hint="the volume group needs free extents for the snapshot "
                    f"({self.snapshot_size}): vgextend it or lower snapshot_size",
                ) from e
            step("snapshot")
            s.snapshots = [x["snapshot"] for x in out["snapshots"]]
            snaps = {x["origin"]: x for x in out["snapshots"]}
            s.freeze = {
                "frozen": out["frozen"],
                "by": out["frozen_by"],
                "lvcreate_s": out["lvcreate_s"],
            }
            if len(lvs) > 1:
                s.notes.append(
                    "volumes are snapshotted one after the other: each is consistent in "
                    "itself, not with the others"
                )
        quiet: set[str] = set()  # live devices frozen (or unmounted) for the whole copy
        if self.live_devices and s.final_pass:
            s.hold = FreezeHold(s.ssh, s.helper.argv("freeze-hold", *self.live_devices))
            held = s.hold.wait_frozen()
            step("freeze")
            quiet = {dev for dev, d in held["devices"].items() if d["quiet"]}
            s.freeze["live_frozen"] = held["frozen"]  # fsfreeze until release
            for dev in sorted(set(self.live_devices) - quiet):
                s.notes.append(f"{dev} holds / and was copied live (flushed, not frozen)")
        if set(self.live_devices) - quiet:
            s.consistency = Consistency.CRASH_INCONSISTENT
        s.snapshot_id = f"agent-{s.machine_id[:12]}-{sid}"
        prev_disks = (previous_token or {}).get("disks", {})
        same_machine = (previous_token or {}).get("machine_id") == s.machine_id
        reasons: list[str] = []
        all_full = True
        for d in machine.disks:
            origin = d.details["origin"]
            snap = snaps.get(origin)
            dev = snap["path"] if snap else origin
            size, hashes = s.helper.hashes(dev, BLOCK_SIZE)
            step(f"hash {d.key}")
            disk = DiskInfo(d.key, size, d.label, dict(d.details))
            manifest = HashManifest(size=size, block_size=BLOCK_SIZE, algo=ALGO, hashes=hashes)
            previous, why = self._previous(s.machine_id, d, size, prev_disks.get(d.key))
            if not same_machine and previous_token is not None:
                previous, why = None, "the token belongs to another machine"
            if previous_token is None:
                why = "first sync"
            mode = "dirty" if previous is not None else "full"
            if previous is None:
                reasons.append(f"{d.key}: {why}")
            else:
                all_full = False
            planned = extents_from_hashes(hashes, size, BLOCK_SIZE, previous)
            sock = s.ssh.work_dir / f"{d.key}.sock"
            fwd = NbdForwarder(
                s.ssh,
                s.helper.argv("serve", dev, self.nbd_server),
                sock,
                s.ssh.work_dir / f"{d.key}.log",
            )
            s.forwarders.append(fwd)
            own = manifest
            stable = bool(snap) or origin in quiet  # cannot change while it is copied
            if not stable:
                own = HashManifest(size=size, block_size=BLOCK_SIZE, algo=ALGO, hashes=list(hashes))
                for ext in planned:
                    if not ext.zero:
                        for i in range(ext.offset // BLOCK_SIZE, -(-ext.end // BLOCK_SIZE)):
                            own.hashes[i] = UNKNOWN_HASH
            export = AgentDiskExport(
                disk=disk,
                nbd_uri=fwd.uri,
                mode=mode,
                manifest=manifest if stable else None,
                own_manifest=own,
                before=hashes if not stable else [],
                settled=stable,
                planned=planned,
                origin=origin,
                snapshot=snap["snapshot"] if snap else "",
            )
            if not snap:
                export.notes.append(
                    "copied frozen (final pass)" if stable else "copied live: crash-inconsistent"
                )
            s.disks.append(export)
        s.full = all_full
        s.reason = "; ".join(reasons)

    def _reusable(
        self,
        left: list[dict[str, Any]],
        lvs: list[DiskInfo],
        machine_id: str,
        previous_token: dict[str, Any] | None,
    ) -> str | None:
        """The session id whose left-over snapshots can be resumed, or None: exactly one
        valid snapshot per replicated LV, all of one earlier session that did not end in a
        restore point, none more than REUSE_MAX_USED full."""
        if not lvs or not left:
            return None
        sids = {x["sid"] for x in left}
        if len(sids) != 1 or "" in sids:
            return None
        sid = sids.pop()
        if (previous_token or {}).get("snapshot_id") == f"agent-{machine_id[:12]}-{sid}":
            return None  # that snapshot already is the last restore point
        if sorted(x["origin"] for x in left) != sorted(d.details["origin"] for d in lvs):
            return None
        if any(x["invalid"] or x["used_percent"] >= REUSE_MAX_USED for x in left):
            return None
        return str(sid)

    # -- manifests of the last points -------------------------------------------------------

    def _manifest_dir(self, machine_id: str, key: str) -> Path:
        return self.state_dir / "agent-manifests" / machine_id / key

    def keep_manifest(self, machine_id: str, key: str, m: HashManifest) -> None:
        d = self._manifest_dir(machine_id, key)
        d.mkdir(parents=True, exist_ok=True)
        m.save(d / f"{m.digest()}.json")
        old = sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime)
        for p in old[:-KEEP_MANIFESTS]:
            p.unlink(missing_ok=True)

    def _previous(
        self, machine_id: str, d: DiskInfo, size: int, prev: dict[str, Any] | None
    ) -> tuple[HashManifest | None, str]:
        if prev is None:
            return None, "new disk"
        if prev.get("size") != size:
            return None, f"size changed {prev.get('size')} -> {size}"
        if prev.get("origin_uuid", "") != d.details.get("origin_uuid", ""):
            return None, f"{d.details['origin']} was re-created (LV UUID changed)"
        p = self._manifest_dir(machine_id, d.key) / f"{prev.get('manifest')}.json"
        if not p.exists():
            return None, "the hash manifest of the last restore point is not on this appliance"
        m = HashManifest.load(p)
        if m.digest() != prev.get("manifest") or m.size != size or m.block_size != BLOCK_SIZE:
            return None, "the hash manifest of the last restore point does not match its token"
        return m, ""


def _device_size(inv: dict[str, Any], dev: str) -> int:
    def walk(nodes: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for n in nodes:
            yield n
            yield from walk(n.get("children") or [])

    for n in walk(inv["block_devices"]):
        if dev in (n.get("path"), f"/dev/{n.get('kname')}", f"/dev/{n.get('name')}"):
            return int(n.get("size") or 0)
    raise AgentError(
        f"device {dev} not found on the server",
        hint="list live_devices by their /dev path, as lsblk shows them",
    )
