"""nbdkit Python plugin: one datastore file over HTTPS, trusted by its pinned SHA-256.

Used for endpoints whose certificate the operator pinned (most ESXi hosts, many vCenters).
libcurl, and so nbdkit's curl plugin, cannot pin a fingerprint: given the certificate as its
only CA it still checks the host name, and ESXi's own certificates often name
``localhost.localdomain`` or a host name the appliance cannot resolve. This reader trusts
exactly what the control plane trusts: the fingerprint, checked right after the TLS handshake
of every connection, before the request (and its session cookie) is written.

Run by :func:`appliance.sources.vsphere.reader.pinned_export`::

    nbdkit --readonly python https_plugin.py url=https://h/folder/..  sha256=<64 hex>
        cookiefile=<0600 file, deleted once nbdkit is up>  size=<bytes>
        [timeout=<s>] [retries=<n>] [retry-delay=<s>]

Standard library only: nbdkit embeds the system Python, not Ferryman's virtual environment.
Requests run in parallel, each on its own keep-alive HTTPS connection from a per-NBD-connection
pool (nbdkit's curl plugin serializes them, and so does nbdkit's retry filter, which is why
this reader retries by itself): over a WAN link many requests in flight hide the latency.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import http.client
import ssl
import threading
import time
import urllib.parse
from typing import Any

import nbdkit  # type: ignore[import-not-found]

API_VERSION = 2

_cfg: dict[str, str] = {}
_state: dict[str, Any] = {}


def config(key: str, value: str) -> None:
    if key not in ("url", "cookiefile", "sha256", "size", "timeout", "retries", "retry-delay"):
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
    _state["retries"] = int(_cfg.get("retries", "3"))
    _state["retry_delay"] = float(_cfg.get("retry-delay", "2"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # trust is the pin, checked in _Pinned.connect
    _state["ctx"] = ctx


def thread_model() -> int:
    return int(nbdkit.THREAD_MODEL_PARALLEL)


class PinMismatch(ssl.SSLError):
    """The server presented another certificate; never retried."""


class _Pinned(http.client.HTTPSConnection):
    def connect(self) -> None:
        super().connect()
        der = self.sock.getpeercert(binary_form=True) or b""
        presented = hashlib.sha256(der).hexdigest()
        if presented != _state["sha256"]:
            self.sock.close()
            raise PinMismatch(
                f"certificate of {self.host} changed: expected SHA-256 {_state['sha256']}, "
                f"presented {presented}; nothing was sent"
            )


def _connect() -> _Pinned:
    return _Pinned(_state["host"], _state["port"], context=_state["ctx"], timeout=_state["timeout"])


def open(readonly: bool) -> dict[str, Any]:  # nbdkit's callback name
    # Requests of one NBD connection run in parallel (THREAD_MODEL_PARALLEL): each takes its
    # own HTTPS connection from this pool, so no two share a socket.
    return {"pool": [], "lock": threading.Lock()}


def close(h: dict[str, Any]) -> None:
    with h["lock"]:
        conns, h["pool"] = h["pool"], []
    for c in conns:
        c.close()


def get_size(h: dict[str, Any]) -> int:
    return int(_state["size"])


def can_multi_conn(h: dict[str, Any]) -> bool:
    return True  # read-only: every connection sees the same bytes


def _take(h: dict[str, Any]) -> _Pinned:
    with h["lock"]:
        if h["pool"]:
            conn: _Pinned = h["pool"].pop()
            return conn
    return _connect()


def _give(h: dict[str, Any], conn: _Pinned) -> None:
    with h["lock"]:
        h["pool"].append(conn)


def pread(h: dict[str, Any], buf: Any, offset: int, flags: int) -> None:
    """Attempt 1 on a pooled connection, 2 on a fresh one at once (the pooled one may have
    been closed by the server), then ``retries`` more after ``retry_delay`` seconds each:
    a datastore that fails for a moment is ridden over, a permanent failure is an EIO."""
    n = len(buf)
    headers = {"Cookie": _state["cookie"], "Range": f"bytes={offset}-{offset + n - 1}"}
    problem = ""
    for attempt in range(2 + _state["retries"]):
        if attempt >= 2:
            time.sleep(_state["retry_delay"])
        conn = _take(h) if attempt == 0 else _connect()
        try:
            conn.request("GET", _state["path"], headers=headers)
            r = conn.getresponse()
            data = r.read()
        except PinMismatch:
            conn.close()
            nbdkit.set_error(errno.EACCES)
            raise
        except (http.client.HTTPException, OSError) as e:
            conn.close()
            problem = str(e) or type(e).__name__
            continue
        if r.status == 206 and len(data) == n:
            _give(h, conn)
            buf[:] = data
            return
        conn.close()
        problem = f"HTTP {r.status}, {len(data)} bytes returned"
    nbdkit.set_error(errno.EIO)
    raise RuntimeError(f"read of {n} bytes at {offset} failed ({problem})")
