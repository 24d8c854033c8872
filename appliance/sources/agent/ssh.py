"""SSH to a replicated server with the host key pinned, like a TLS thumbprint.

Why OpenSSH's client and not a Python SSH library: it is on every appliance, it is what
operators trust, and its stdin/stdout can be a unix socket, which is how NBD travels (see
``NbdForwarder``). The pinning is strict: a known_hosts file with exactly the pinned key
under a fixed alias, ``StrictHostKeyChecking=yes`` and ``HostKeyAlgorithms`` limited to the
pinned key's type. A server that shows any other key is refused by ssh itself during key
exchange, before authentication, so no command can run.

The private key is only ever a file name on ssh's command line (``-i``, mode 0600); a key
that comes from the vault is written to such a file in the session's private directory and
deleted when the session ends.

One master connection (``ControlMaster``) carries every command and NBD channel of a
session: a TCP + key exchange per helper step costs seconds on a slow link. A channel whose
master died falls back to its own connection, with the same pinning; the next command
starts a new master.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import re
import select
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from appliance.sources.agent.errors import (
    AgentError,
    AgentHostKeyChanged,
    AgentUnreachable,
)

log = logging.getLogger(__name__)

KEY_PREFERENCE = ("ssh-ed25519", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "rsa-sha2-512")
HOST_ALIAS = "ferryman-pinned"  # the known_hosts entry does not depend on address or port
ALIVE_INTERVAL_S = 5  # keepalives: a dead link is noticed after 3 missed answers (15 s)
UNIX_PATH_MAX = 107  # sun_path is 108 bytes with its NUL
CONTROL_SUFFIX = 17  # ssh binds the master at ControlPath + ".XXXXXXXXXXXXXXXX" first
MASTER_START_TIMEOUT_S = 60.0  # TCP + key exchange + auth; a TCG test guest needs ~5 s


@dataclass(frozen=True)
class HostKey:
    type: str  # "ssh-ed25519", "ecdsa-sha2-nistp256", "ssh-rsa"
    blob: str  # base64, as in known_hosts

    @classmethod
    def parse(cls, text: str) -> HostKey:
        """'ssh-ed25519 AAAA...' (a leading host field as ssh-keyscan prints it is skipped)."""
        parts = text.split()
        for i, p in enumerate(parts[:-1]):
            if p.startswith(("ssh-", "ecdsa-")):
                try:
                    base64.b64decode(parts[i + 1], validate=True)
                except ValueError:
                    break
                return cls(p, parts[i + 1])
        raise AgentError(
            f"'{text[:60]}' is not an SSH public host key",
            hint="give the line as ssh-keyscan prints it: TYPE BASE64",
        )

    @property
    def fingerprint(self) -> str:
        """SHA256:... exactly as ``ssh-keygen -lf`` and ssh's own messages print it."""
        digest = hashlib.sha256(base64.b64decode(self.blob)).digest()
        return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")

    @property
    def line(self) -> str:
        return f"{self.type} {self.blob}"

    @property
    def algorithms(self) -> str:
        """HostKeyAlgorithms that make the server present exactly this key."""
        if self.type == "ssh-rsa":
            return "rsa-sha2-512,rsa-sha2-256,ssh-rsa"
        return self.type


def scan_host_key(host: str, port: int = 22, timeout: float = 30.0) -> HostKey:
    """What the server presents now, for the operator to confirm at first contact."""
    try:
        r = subprocess.run(
            [
                "ssh-keyscan",
                "-T",
                str(int(timeout)),
                "-p",
                str(port),
                "-t",
                "ed25519,ecdsa,rsa",
                host,
            ],
            capture_output=True,
            text=True,
            timeout=timeout + 10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AgentUnreachable(
            f"cannot read the SSH host key of {host}:{port}: {e}",
            hint="check the address, the port and that sshd runs",
        ) from e
    keys: dict[str, HostKey] = {}
    for ln in r.stdout.splitlines():
        if ln.startswith("#") or not ln.strip():
            continue
        with contextlib.suppress(AgentError):
            k = HostKey.parse(ln)
            keys[k.type] = k
    for t in (*KEY_PREFERENCE, "ssh-rsa"):
        if t in keys:
            return keys[t]
    if keys:
        return next(iter(keys.values()))
    raise AgentUnreachable(
        f"{host}:{port} presented no SSH host key",
        hint="check the address, the port and that sshd runs there",
    )


class Ssh:
    """One server, one pinned key, one private directory for the session's files."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        host_key: HostKey,
        identity: Path | Callable[[], str],
        work_dir: Path,
        connect_timeout: float = 20.0,
    ) -> None:
        self.host, self.port, self.user = host, port, user
        self.host_key = host_key
        self.connect_timeout = connect_timeout
        self.work_dir = work_dir
        work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(work_dir, 0o700)
        self.known_hosts = work_dir / "known_hosts"
        self.known_hosts.write_text(f"{HOST_ALIAS} {host_key.line}\n")
        self.control = work_dir / "cm"
        if len(str(self.control)) + CONTROL_SUFFIX > UNIX_PATH_MAX:
            raise AgentError(
                f"the run directory {work_dir.parent} is too deep for ssh's control socket "
                f"(unix socket paths end at {UNIX_PATH_MAX} bytes)",
                hint="set FERRYMAN_RUN_DIR to a shorter directory, e.g. /run/ferryman",
            )
        self._own_key: Path | None = None
        if isinstance(identity, Path):
            self.key_file = identity
            mode = identity.stat().st_mode & 0o777
            if mode & 0o077:
                raise AgentError(
                    f"SSH key {identity} is readable by others (mode {mode:o})",
                    hint=f"chmod 600 {identity}",
                )
        else:
            self.key_file = work_dir / "id"
            fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(identity().rstrip("\n") + "\n")
            self._own_key = self.key_file
        self._master: subprocess.Popen[bytes] | None = None
        self._master_err: IO[bytes] | None = None
        self._lock = threading.Lock()

    @property
    def target(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"

    def _opts(self) -> list[str]:
        return [
            "-F",
            "/dev/null",  # no user or system ssh_config can weaken the pinning
            "-i",
            str(self.key_file),
            "-p",
            str(self.port),
            "-l",
            self.user,
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            f"HostKeyAlias={HOST_ALIAS}",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "UpdateHostKeys=no",
            "-o",
            f"HostKeyAlgorithms={self.host_key.algorithms}",
            "-o",
            f"ConnectTimeout={int(self.connect_timeout)}",
            "-o",
            f"ServerAliveInterval={ALIVE_INTERVAL_S}",
            "-o",
            "ServerAliveCountMax=3",
            "-o",
            f"ControlPath={self.control}",
            "-o",
            "LogLevel=ERROR",
        ]

    def argv(self, remote: Sequence[str]) -> list[str]:
        """ssh command line running ``remote`` (quoted for the remote shell) over the master."""
        return [
            "ssh",
            *self._opts(),
            "-o",
            "ControlMaster=no",
            "-T",
            self.host,
            "--",
            " ".join(shlex.quote(a) for a in remote),
        ]

    # -- the master connection -------------------------------------------------------------

    def connect(self) -> None:
        """Start (or restart) the master connection; raises with the reason it failed."""
        with self._lock:
            if self._master is not None and self._master.poll() is None:
                return
            self._start_master()

    def _start_master(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()  # stale socket of a master that died
        err = open(self.work_dir / "master.err", "w+b")  # noqa: SIM115 - kept open while it runs
        self._master_err = err
        self._master = subprocess.Popen(
            ["ssh", *self._opts(), "-o", "ControlMaster=yes", "-N", "-T", self.host],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
        end = time.monotonic() + MASTER_START_TIMEOUT_S
        while time.monotonic() < end:
            if self._master.poll() is not None:
                err.seek(0)
                msg = err.read().decode(errors="replace")
                self._master = None
                raise self.classify(msg)
            if self.control.exists() and self._check_master():
                log.info("ssh master to %s up (pid %d)", self.target, self._master.pid)
                return
            time.sleep(0.1)
        self._stop_master()
        raise AgentUnreachable(
            f"SSH to {self.target} did not come up within {MASTER_START_TIMEOUT_S:.0f}s",
            hint="check the network path and that sshd answers",
        )

    def _check_master(self) -> bool:
        r = subprocess.run(
            ["ssh", *self._opts(), "-O", "check", self.host],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return r.returncode == 0

    @property
    def master_pid(self) -> int | None:
        m = self._master
        return m.pid if m is not None and m.poll() is None else None

    def _stop_master(self) -> None:
        m, self._master = self._master, None
        if m is not None and m.poll() is None:
            m.terminate()
            try:
                m.wait(10)
            except subprocess.TimeoutExpired:
                m.kill()
                m.wait(10)
        if self._master_err is not None:
            self._master_err.close()
            self._master_err = None

    def close(self) -> None:
        with self._lock:
            self._stop_master()
        with contextlib.suppress(FileNotFoundError):
            self.control.unlink()
        if self._own_key is not None:
            with contextlib.suppress(FileNotFoundError):
                self._own_key.unlink()

    # -- commands --------------------------------------------------------------------------

    def classify(self, stderr: str) -> AgentError:
        """Turn ssh's own failure (exit 255) into an operator-facing error."""
        text = stderr.strip()
        if (
            "Host key verification failed" in text
            or "HOST IDENTIFICATION HAS CHANGED" in text
            or "host key is known" in text
            or "no matching host key type" in text
        ):
            seen = re.findall(r"SHA256:[A-Za-z0-9+/]+", text)
            shown = f" ({seen[0]})" if seen else ""
            return AgentHostKeyChanged(
                f"{self.target} presented another SSH host key{shown} than the pinned "
                f"{self.host_key.fingerprint}; nothing was run on it",
                hint="if the server was reinstalled, confirm its new key and pin it again "
                "(remove and re-add the source); otherwise treat it as an attack",
            )
        if "Permission denied" in text:
            return AgentUnreachable(
                f"{self.target} refused the appliance's SSH key",
                hint=f"add the appliance's public key to ~{self.user}/.ssh/authorized_keys",
            )
        last = text.splitlines()[-1] if text else "no message"
        return AgentUnreachable(
            f"SSH to {self.target} failed: {last}",
            hint="check the address, the port, the network path and that sshd runs",
        )

    def run(
        self,
        remote: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float = 300.0,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run a remote command; ssh-level failures raise, the command's status is returned."""
        self.connect()
        try:
            r = subprocess.run(
                self.argv(remote),
                input=input,
                capture_output=True,
                timeout=timeout,
                check=False,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as e:
            raise AgentUnreachable(
                f"{remote[0] if remote else 'command'} on {self.target} did not finish "
                f"within {timeout:.0f}s",
                hint="the server or the link is overloaded; try again",
            ) from e
        if r.returncode == 255:
            raise self.classify(r.stderr.decode(errors="replace"))
        return r

    def popen(self, remote: Sequence[str], *, stdin: int, stdout: int, stderr: Any) -> Any:
        """A long-running remote command with its stdin/stdout on the given descriptors."""
        try:
            self.connect()
        except AgentError as e:
            log.warning("ssh master to %s: %s; the channel connects on its own", self.target, e)
        return subprocess.Popen(self.argv(remote), stdin=stdin, stdout=stdout, stderr=stderr)


class NbdForwarder:
    """A local unix socket whose every connection is an SSH channel to an NBD server on
    stdin/stdout of the remote helper. The copier reconnects to the same socket after a
    dropped link and gets a fresh channel to the same snapshot; no port opens anywhere."""

    def __init__(self, ssh: Ssh, remote: Sequence[str], sock: Path, log_file: Path) -> None:
        self.ssh = ssh
        self.remote = list(remote)
        self.sock = sock
        self.log_file = log_file
        self.procs: list[subprocess.Popen[bytes]] = []
        self._closed = threading.Event()
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(sock))
        os.chmod(sock, 0o600)
        self._listener.listen(8)
        self._thread = threading.Thread(target=self._loop, name=f"nbd-fwd-{sock.name}", daemon=True)
        self._thread.start()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def _loop(self) -> None:
        while not self._closed.is_set():
            r, _, _ = select.select([self._listener], [], [], 0.2)
            if not r or self._closed.is_set():
                continue
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            try:
                with open(self.log_file, "ab") as errf:
                    p = self.ssh.popen(
                        self.remote, stdin=conn.fileno(), stdout=conn.fileno(), stderr=errf
                    )
                self.procs.append(p)
                log.debug("nbd channel for %s: ssh pid %d", self.sock.name, p.pid)
            except OSError as e:
                log.warning("cannot start an SSH channel for %s: %s", self.sock, e)
            finally:
                conn.close()
            self.procs = [p for p in self.procs if p.poll() is None]

    def alive_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(5)
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self.procs.clear()
