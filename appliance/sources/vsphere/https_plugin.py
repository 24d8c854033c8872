"""nbdkit Python plugin: one datastore file over HTTPS, trusted by its pinned SHA-256.

Used for endpoints whose certificate the operator pinned (most ESXi hosts, many vCenters).
libcurl, and so nbdkit's curl plugin, cannot pin a fingerprint: given the certificate as its
only CA it still checks the host name, and ESXi's own certificates often name
``localhost.localdomain`` or a host name the appliance cannot resolve. This reader trusts
exactly what the control plane trusts: the fingerprint, checked right after the TLS handshake
of every connection, before the request (and its session cookie) is written.

Run by :func:`appliance.sources.vsphere.reader.pinned_export`::

    nbdkit --readonly python https_plugin.py url=https://h/folder/..  sha256=<64 hex>
        cookiefile=<0600 file, deleted once nbdkit is up>  size=<bytes>  [timeout=<s>]

Standard library only: nbdkit embeds the system Python, not Ferryman's virtual environment.
Requests run in parallel (one keep-alive connection per NBD connection); nbdkit's retry
filter in front reopens after errors.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import http.client
import ssl
import urllib.parse
from typing import Any

import nbdkit  # type: ignore[import-not-found]

API_VERSION = 2

_cfg: dict[str, str] = {}
_state: dict[str, Any] = {}


def config(key: str, value: str) -> None:
    if key not in ("url", "cookiefile", "sha256", "size", "timeout"):
        raise RuntimeError(f"unknown parameter {key}")
    _cfg[key] = value


def config_complete() -> None:
    for key in ("url", "cookiefile", "sha256", "size"):
        if key not in _cfg:
            raise RuntimeError(f"missing parameter {key}")
    with builtins.open(_cfg["cookiefile"]) as f:  # "open" below is nbdkit's callback
        _state["cookie"] = f.read().strip()
    u = urllib.parse.urlsplit(_cfg["url"])
    if u.scheme != "https" or not u.hostname:
        raise RuntimeError("url must be https://HOST/...")
    _state["host"] = u.hostname
    _state["port"] = u.port or 443
    _state["path"] = u.path + ("?" + u.query if u.query else "")
    _state["sha256"] = _cfg["sha256"].replace(":", "").lower()
    _state["size"] = int(_cfg["size"])
    _state["timeout"] = float(_cfg.get("timeout", "120"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # trust is the pin, checked in _Pinned.connect
    _state["ctx"] = ctx


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


class _Pinned(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        der = self.sock.getpeercert(binary_form=True) or b""
        presented = hashlib.sha256(der).hexdigest()
        if presented != _state["sha256"]:
            self.sock.close()
            nbdkit.set_error(errno.EACCES)
            raise ssl.SSLError(
                f"certificate of {self.host} changed: expected SHA-256 {_state['sha256']}, "
                f"presented {presented}; nothing was sent"
            )


def _connect() -> _Pinned:
    return _Pinned(_state["host"], _state["port"], context=_state["ctx"], timeout=_state["timeout"])


def open(readonly: bool) -> dict[str, Any]:  # nbdkit's callback name
    return {"conn": None}


def close(h: dict[str, Any]) -> None:
    if h["conn"] is not None:
        h["conn"].close()


def get_size(h: dict[str, Any]) -> int:
    return int(_state["size"])


def can_multi_conn(h: dict[str, Any]) -> bool:
    return True  # read-only: every connection sees the same bytes


def pread(h: dict[str, Any], buf: Any, offset: int, flags: int) -> None:
    n = len(buf)
    headers = {"Cookie": _state["cookie"], "Range": f"bytes={offset}-{offset + n - 1}"}
    for attempt in (1, 2):
        if h["conn"] is None:
            h["conn"] = _connect()
        conn = h["conn"]
        try:
            conn.request("GET", _state["path"], headers=headers)
            r = conn.getresponse()
            data = r.read()
        except (http.client.HTTPException, ConnectionError) as e:
            # A keep-alive connection the server closed: one fresh attempt.
            conn.close()
            h["conn"] = None
            if attempt == 2:
                nbdkit.set_error(errno.EIO)
                raise RuntimeError(f"read of {n} bytes at {offset} failed: {e}") from e
            continue
        if r.status != 206 or len(data) != n:
            conn.close()
            h["conn"] = None
            nbdkit.set_error(errno.EIO)
            raise RuntimeError(
                f"read of {n} bytes at {offset}: HTTP {r.status}, {len(data)} bytes returned"
            )
        buf[:] = data
        return
