"""Fixtures of the linux-agent tests: ONE Debian server guest per test session, under TCG.

The host kernel has no device-mapper, so the "server" is the ``agent-server`` test guest
(images/guests/agent-server): root on LVM, sshd, python3, nbdkit, qemu-utils. It boots under
TCG with user-mode networking; its sshd is reached on a free 127.0.0.1 port (hostfwd). A
throw-away ed25519 key made for this session reaches the guest through qemu's fw_cfg, so no
key lives in the image or the repository. A second, blank virtio disk becomes volume group
``vgdata`` with the LV ``data`` (ext4 on /srv/data, the filesystem that receives writes) and
free extents for snapshots. A third disk, /dev/vdc, holds ext4 without LVM on /srv/live
(live-copy mode).

Fixtures: ``agent_guest`` (session: the running guest, see ``AgentGuest``), ``agent_source``
(a ``LinuxAgentSource`` pinned to the guest, replicating vgdata/data), ``agent_store`` (a
temporary volume store dir for chains).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.sources.agent.source import LinuxAgentSource
from appliance.sources.agent.ssh import HostKey, scan_host_key

ROOT = Path(__file__).resolve().parents[1]
BOOT_TIMEOUT_S = 420.0  # TCG boot of Debian: 30-60 s alone, minutes with other helpers busy
DATA_LV_MIB = 128  # hashing runs at ~12 MB/s inside the TCG guest: keep the LV small
DATA_VG_DISK_MIB = 1024
LIVE_DISK_MIB = 64  # /dev/vdc: ext4 on a plain disk, no LVM (live-copy mode)
MARKER = re.compile(r"FERRYMAN-BOOT-OK")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentGuest:
    """The running guest: ``ssh(cmd)`` runs a shell command as root (test side channel)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = _free_port()
        self.key = work / "id_ed25519"
        self.known_hosts = work / "known_hosts"
        self.console = work / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.host_key: HostKey | None = None
        self.boot_seconds = 0.0

    def start(self) -> None:
        sys.path.insert(0, str(ROOT / "images" / "guests"))
        import builder  # type: ignore[import-not-found]

        image = builder.build("agent-server")
        overlay = self.work / "root.qcow2"
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(image),
                "-F",
                "qcow2",
                str(overlay),
            ],
            check=True,
        )
        data = self.work / "data.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(data), f"{DATA_VG_DISK_MIB}M"],
            check=True,
        )
        live = self.work / "live.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(live), f"{LIVE_DISK_MIB}M"],
            check=True,
        )
        subprocess.run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "ferryman-test",
                "-f",
                str(self.key),
            ],
            check=True,
        )
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [
                "qemu-system-x86_64",
                "-accel",
                "tcg",
                "-m",
                "1024",
                "-smp",
                "1",
                "-display",
                "none",
                "-serial",
                f"file:{self.console}",
                "-monitor",
                "none",
                "-drive",
                f"file={overlay},format=qcow2,if=virtio,cache=unsafe",
                "-drive",
                f"file={data},format=qcow2,if=virtio,cache=unsafe",
                "-drive",
                f"file={live},format=qcow2,if=virtio,cache=unsafe",
                "-netdev",
                f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
                "-device",
                "virtio-net-pci,netdev=n0",
                "-fw_cfg",
                f"name=opt/ferryman/authorized_keys,file={self.key}.pub",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.work / "qemu.err", "wb"),  # noqa: SIM115
        )
        end = time.monotonic() + BOOT_TIMEOUT_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu exited: {(self.work / 'qemu.err').read_text()}")
            text = self.console.read_text(errors="replace") if self.console.exists() else ""
            if MARKER.search(text):
                break
            time.sleep(1)
        else:
            raise RuntimeError(
                f"agent-server did not boot in {BOOT_TIMEOUT_S}s; see {self.console}"
            )
        while time.monotonic() < end:
            r = self._ssh_raw("true", timeout=30)
            if r.returncode == 0:
                break
            time.sleep(2)
        else:
            raise RuntimeError("sshd of agent-server did not answer")
        self.boot_seconds = time.monotonic() - t0
        self.host_key = scan_host_key("127.0.0.1", self.port)
        mkfs = "mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0"  # no background writes
        self.ssh(
            "set -e; pvcreate -q /dev/vdb; vgcreate -q vgdata /dev/vdb; "
            f"lvcreate -q -y -L {DATA_LV_MIB}M -n data vgdata; {mkfs} /dev/vgdata/data; "
            "mkdir -p /srv/data; mount /dev/vgdata/data /srv/data; "
            f"{mkfs} /dev/vdc; mkdir -p /srv/live; mount /dev/vdc /srv/live"
        )

    def _ssh_raw(
        self, cmd: str, timeout: float = 300, input: bytes | None = None, pinned: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        # pinned=False: the test's side channel while a test has changed the host key.
        return subprocess.run(
            [
                "ssh",
                "-F",
                "/dev/null",
                "-i",
                str(self.key),
                "-p",
                str(self.port),
                "-o",
                "BatchMode=yes",
                "-o",
                f"StrictHostKeyChecking={'accept-new' if pinned else 'no'}",
                "-o",
                f"UserKnownHostsFile={self.known_hosts if pinned else '/dev/null'}",
                "-o",
                "ConnectTimeout=20",
                "-o",
                "LogLevel=ERROR",
                "root@127.0.0.1",
                cmd,
            ],
            capture_output=True,
            timeout=timeout,
            input=input,
            check=False,
        )

    def ssh(
        self, cmd: str, timeout: float = 300, input: bytes | None = None, pinned: bool = True
    ) -> str:
        r = self._ssh_raw(cmd, timeout, input, pinned)
        if r.returncode != 0:
            raise RuntimeError(f"guest: {cmd!r} failed ({r.returncode}): {r.stderr.decode()}")
        return r.stdout.decode()

    def sha256_of(self, dev: str) -> str:
        return self.ssh(f"sha256sum {shlex.quote(dev)}").split()[0]

    def write(self, path: str, mib: int) -> None:
        """Write ``mib`` MiB of incompressible data into a file and sync it to the LV."""
        self.ssh(f"head -c {mib}M /dev/urandom > {shlex.quote(path)} && sync")

    def accepted_logins(self, pinned: bool = True) -> int:
        """sshd's count of logins so far (this query's own included)."""
        out = self.ssh(
            "journalctl -q -u ssh --no-pager | grep -c 'Accepted publickey' || true", pinned=pinned
        )
        return int(out.strip() or 0)

    def snapshots(self) -> list[str]:
        """Every LV carrying the ferryman tag (what the agent left behind)."""
        out = self.ssh("lvs --noheadings -o vg_name,lv_name @ferryman 2>/dev/null || true")
        return ["/".join(ln.split()) for ln in out.splitlines() if ln.strip()]

    def helpers_left(self) -> list[str]:
        out = self.ssh("ls -d /tmp/ferryman-agent.* 2>/dev/null || true")
        return [ln for ln in out.split() if ln]

    def agent_processes(self) -> list[str]:
        out = self.ssh(
            "ps -eo pid,args | grep -E 'ferryman_agent|nbdkit|qemu-nbd' | grep -v grep || true"
        )
        return [ln.strip() for ln in out.splitlines() if ln.strip()]

    def pause(self) -> None:
        """The server stops answering (the link is down): qemu is stopped with SIGSTOP."""
        assert self.proc is not None, "pause needs a guest this session started"
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)


def image_digest(path: Path, tmp: Path) -> tuple[str, int]:
    """(sha256, number of non-zero 1 MiB blocks) of the guest-visible bytes of a qcow2 image
    (a restore point)."""
    raw = tmp / f"{path.name}.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(raw)], check=True
    )
    h = hashlib.sha256()
    nonzero = 0
    zero = bytes(1 << 20)
    with open(raw, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            nonzero += chunk != zero[: len(chunk)]
    raw.unlink()
    return h.hexdigest(), nonzero


def image_sha256(path: Path, tmp: Path) -> str:
    return image_digest(path, tmp)[0]


def assert_clean(guest: AgentGuest) -> None:
    """Nothing of the agent left on the server: snapshots, helper files, processes (one
    login: each costs seconds under TCG)."""
    out = guest.ssh(
        "echo '# snapshots'; lvs --noheadings -o vg_name,lv_name @ferryman 2>/dev/null; "
        "echo '# helper files'; ls -d /tmp/ferryman-agent.* 2>/dev/null; "
        "echo '# processes'; ps -eo pid,args | grep -E 'ferryman_agent|nbdkit|qemu-nbd|fsfreeze' "
        "| grep -v grep; true"
    )
    left: dict[str, list[str]] = {}
    for ln in out.splitlines():
        if ln.startswith("# "):
            what = left.setdefault(ln[2:], [])
        elif ln.strip():
            what.append(ln.strip())
    assert left == {"snapshots": [], "helper files": [], "processes": []}, left


def _attach(info_file: Path) -> AgentGuest:
    """A guest already running (developer loop: FERRYMAN_AGENT_GUEST=info.json written by a
    process that called AgentGuest.start() and keeps it alive)."""
    info = json.loads(info_file.read_text())
    g = AgentGuest(Path(info["key"]).parent)
    g.port = int(info["port"])
    g.host_key = HostKey.parse(info["host_key"])
    return g


@pytest.fixture(scope="session")
def agent_guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentGuest]:
    if os.environ.get("FERRYMAN_AGENT_GUEST"):
        yield _attach(Path(os.environ["FERRYMAN_AGENT_GUEST"]))
        return
    work = tmp_path_factory.mktemp("agent-guest")
    os.chmod(work, 0o700)
    g = AgentGuest(work)
    try:
        g.start()
        yield g
    finally:
        g.stop()


@pytest.fixture
def agent_dirs(tmp_path: Path) -> tuple[Path, Path]:
    run, state = tmp_path / "run", tmp_path / "state"
    run.mkdir(mode=0o700)
    state.mkdir(mode=0o700)
    return run, state


@pytest.fixture
def agent_source(agent_guest: AgentGuest, agent_dirs: tuple[Path, Path]) -> LinuxAgentSource:
    """The adapter as the registry would build it, pinned to the guest's key."""
    assert agent_guest.host_key is not None
    return LinuxAgentSource(
        host="127.0.0.1",
        port=agent_guest.port,
        user="root",
        identity=agent_guest.key,
        host_key=agent_guest.host_key.line,
        run_dir=agent_dirs[0],
        state_dir=agent_dirs[1],
        volumes=["vgdata/data"],
        snapshot_size="64M",
        name="agent-server",
    )


_ = contextlib
