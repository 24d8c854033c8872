"""A libvirt host reached over ``qemu+ssh://``: the backup's NBD socket lives THERE.

libvirt's own connection runs over ssh, but the pull-mode backup serves every disk on a
unix socket on the KVM host. The data path reaches it through OpenSSH's unix-socket
forwarding (``ssh -N -L local.sock:remote.sock``): one ssh process per session, every NBD
connection of the copier a channel of it. The ssh options are the ones libvirt itself uses
for the URI (``command``, ``keyfile``, ``no_verify``, user, port), so what authenticates
libvirt authenticates the tunnel, with the same host-key checking.

The remote user needs libvirt access and must be able to connect to the socket qemu creates
(root, as libvirt's qemu+ssh setups usually are). The remote directory for sockets and
scratch files (``remote_dir``) is created mode 1777 so libvirt-qemu can write in it.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import nbd

from appliance.datapath.copier import connect
from appliance.datapath.writer import die_with_parent
from appliance.errors import FerrymanError

log = logging.getLogger(__name__)

SSH_TIMEOUT_S = 60.0
TUNNEL_WAIT_S = 30.0


class LibvirtRemoteError(FerrymanError):
    code = "libvirt_source"


def is_remote(uri: str) -> bool:
    """A libvirt URI naming another host (qemu:///system and qemu+unix:// are local)."""
    return bool(urlsplit(uri).hostname)


class RemoteHost:
    def __init__(self, uri: str) -> None:
        u = urlsplit(uri)
        if "+ssh" not in u.scheme or not u.hostname:
            raise LibvirtRemoteError(
                f"libvirt at {uri}: the backup's NBD socket is on that host and only "
                "qemu+ssh:// can reach it",
                hint="use qemu+ssh://USER@HOST/system (the appliance's key authorised there)",
            )
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        self.uri = uri
        self.host = u.hostname
        self.port = u.port
        self.user = u.username
        self.command = q.get("command", "ssh")
        self.keyfile = q.get("keyfile")
        self.no_verify = q.get("no_verify") == "1"

    def argv(self, *extra: str) -> list[str]:
        a = [self.command, "-T", "-o", "BatchMode=yes", "-o", "ConnectTimeout=30"]
        if self.port:
            a += ["-p", str(self.port)]
        if self.user:
            a += ["-l", self.user]
        if self.keyfile:
            a += ["-i", self.keyfile]
        if self.no_verify:
            a += ["-o", "StrictHostKeyChecking=no"]
        return [*a, *extra, str(self.host)]

    def run(self, script: str) -> str:
        """Run a shell command on the host; its stdout, or a clear error."""
        try:
            r = subprocess.run(
                [*self.argv(), script], capture_output=True, text=True, timeout=SSH_TIMEOUT_S
            )
        except subprocess.TimeoutExpired as e:
            raise LibvirtRemoteError(
                f"ssh to {self.host} did not answer within {SSH_TIMEOUT_S:.0f}s",
                hint="check the network path to the KVM host",
            ) from e
        if r.returncode != 0:
            raise LibvirtRemoteError(
                f"ssh to {self.host} failed ({r.returncode}): {r.stderr.strip()[-300:]}",
                hint="the key and host key that work for libvirt's qemu+ssh:// must work here",
            )
        return r.stdout

    def prepare_dir(self, d: Path) -> None:
        q = shlex.quote(str(d))
        self.run(f"mkdir -p {q} && chmod 1777 {q}")

    def remove(self, files: list[Path]) -> None:
        if files:
            self.run("rm -f " + " ".join(shlex.quote(str(f)) for f in files))


class Tunnel:
    """``ssh -N -L local:remote``: the remote backup socket as a local unix socket."""

    def __init__(self, host: RemoteHost, local: Path, remote: Path, log_file: Path) -> None:
        self.host, self.local, self.remote = host, local, remote
        local.unlink(missing_ok=True)
        with open(log_file, "ab") as log:
            self.proc = subprocess.Popen(
                host.argv(
                    "-N",
                    "-o",
                    "ExitOnForwardFailure=yes",
                    "-o",
                    "StreamLocalBindUnlink=yes",
                    "-o",
                    "ServerAliveInterval=15",
                    "-o",
                    "LogLevel=ERROR",
                    "-L",
                    f"{local}:{remote}",
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                preexec_fn=die_with_parent,  # a killed daemon leaves no tunnel behind
            )
        self.log_file = log_file

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.local}"

    def wait(self, export: str, timeout: float = TUNNEL_WAIT_S) -> None:
        """Until an NBD handshake through the tunnel succeeds (the remote socket exists)."""
        end = time.monotonic() + timeout
        last = ""
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                break
            if self.local.exists():
                try:
                    h = connect(self.uri(export), name="tunnel-probe", timeout=10.0)
                    h.shutdown()
                    return
                except nbd.Error as e:
                    last = e.string or str(e)
            time.sleep(0.1)
        err = self.log_file.read_text(errors="replace").strip()[-300:]
        self.close()
        raise LibvirtRemoteError(
            f"no NBD through the ssh tunnel to {self.host.host}:{self.remote}: "
            f"{err or last or 'timed out'}",
            hint="the ssh user must be allowed to forward unix sockets "
            "(AllowStreamLocalForwarding) and to connect to the backup socket (root)",
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        with contextlib.suppress(FileNotFoundError):
            self.local.unlink()
        with contextlib.suppress(FileNotFoundError):
            err = self.log_file.read_text(errors="replace").strip()
            if err:
                log.warning("ssh tunnel to %s:%s: %s", self.host.host, self.remote, err[-500:])
            self.log_file.unlink()
