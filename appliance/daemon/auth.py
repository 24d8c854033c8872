"""Who is calling, and may they? Identity comes from the kernel, not from the client.

The API socket is a unix socket: SO_PEERCRED gives the caller's uid and pid, which a client
cannot forge (the x-ferryman-user header is ignored for identity). Roles map to appliance
accounts through groups:

    root, or a member of ``ferryman-admin``   -> admin     (sources, deleting points)
    a member of ``ferryman-operator``         -> operator  (syncs, test runs, cutover)
    anyone else who can open the socket       -> viewer    (the socket is root:ferryman 0660)

Where the caller sits (console or an SSH client address) is read from the caller's own
environment (SSH_CONNECTION in /proc/PID/environ): informational, for the audit trail.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from appliance.errors import FerrymanError

ROLES = ("viewer", "operator", "admin")
ADMIN_GROUP = "ferryman-admin"
OPERATOR_GROUP = "ferryman-operator"


class Forbidden(FerrymanError):
    code = "forbidden"
    http_status = 403


@dataclass(frozen=True)
class Caller:
    uid: int
    pid: int
    user: str
    role: str
    origin: str

    def allows(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def _groups(user: str, gid: int) -> set[str]:
    names = {g.gr_name for g in grp.getgrall() if user in g.gr_mem}
    try:
        names.add(grp.getgrgid(gid).gr_name)
    except KeyError:
        pass
    return names


def role_of(uid: int) -> tuple[str, str]:
    if uid == 0:
        return "root", "admin"
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        return str(uid), "viewer"
    groups = _groups(pw.pw_name, pw.pw_gid)
    if ADMIN_GROUP in groups:
        return pw.pw_name, "admin"
    if OPERATOR_GROUP in groups:
        return pw.pw_name, "operator"
    return pw.pw_name, "viewer"


def origin_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
    except OSError:
        return "unknown"
    ssh = env.get(b"SSH_CONNECTION") or env.get(b"SSH_CLIENT")
    return f"ssh:{ssh.split()[0].decode(errors='replace')}" if ssh else "console"


def peer_of_unix_socket(transport: Any) -> tuple[str, int] | None:
    """uvicorn's remote address for a unix socket: ('uid:N', pid) from SO_PEERCRED."""
    sock: socket.socket | None = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return (f"uid:{uid}", pid)


def install_peer_credentials() -> None:
    """Make uvicorn put the kernel's peer credentials into scope['client']."""
    from uvicorn.protocols.http import h11_impl  # the daemon runs uvicorn with http="h11"

    original = h11_impl.get_remote_addr  # type: ignore[attr-defined]

    def remote(transport: Any) -> tuple[str, int] | None:
        return peer_of_unix_socket(transport) or original(transport)

    h11_impl.get_remote_addr = remote  # type: ignore[attr-defined]


def caller(request: Request) -> Caller:
    client = request.client
    if client is None or not str(client.host).startswith("uid:"):
        # Not a unix socket (the API is never served on TCP): no identity, least privilege.
        return Caller(-1, 0, "unknown", "viewer", "unknown")
    uid, pid = int(str(client.host)[4:]), int(client.port)
    user, role = role_of(uid)
    return Caller(uid, pid, user, role, origin_of(pid) if pid != os.getpid() else "ferrymand")


def forbidden(c: Caller, role: str, action: str) -> Forbidden:
    return Forbidden(
        f"{c.user} ({c.role}) may not {action}: it needs the {role} role",
        hint=f"ask an admin to add {c.user} to the group "
        f"{ADMIN_GROUP if role == 'admin' else OPERATOR_GROUP}",
    )


def authorize(request: Request, role: str, action: str) -> Caller:
    """The caller if their role allows ``action``; otherwise the refusal is written to the
    audit trail and raised. Every API module (daemon, plans) checks roles through this."""
    c = caller(request)
    if not c.allows(role):
        err = forbidden(c, role, action)
        request.app.state.ferryman.audit(
            c.user,
            c.origin,
            action,
            {"path": request.url.path, "method": request.method},
            f"refused: {err}",
        )
        raise err
    return c
