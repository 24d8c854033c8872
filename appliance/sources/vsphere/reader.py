"""Read a frozen base disk and serve it over NBD on a local unix socket.

Two readers, one contract (a read-only NBD export of exactly the disk's bytes):

- **datastore HTTPS** (default, nothing to install): Range requests on
  ``https://<host>/folder/<dir>/<disk>-flat.vmdk?dcPath=..&dsName=..``, authenticated by the
  vSphere session cookie. While a snapshot exists the base ``-flat.vmdk`` is frozen (the guest
  writes to the delta), so this reads one consistent point in time. Served by nbdkit's curl
  plugin when the endpoint is trusted through CAs (libcurl checks chain and host name), and by
  :mod:`.https_plugin` (nbdkit python) when the endpoint is pinned: libcurl cannot pin a
  fingerprint, and ESXi certificates often name a host the appliance does not use.
- **VDDK** (when the operator supplies VMware's VDDK, which Ferryman cannot ship): nbdkit's
  vddk plugin, opened on the snapshot, NBDSSL transport (or others the operator chooses).

Secrets never reach argv (``/proc/*/cmdline`` is world-readable): the cookie and the VDDK
password go to nbdkit as files (``cookie=+FILE``, ``cookiefile=FILE``, ``password=+FILE``),
written 0600 in a 0700 directory and deleted as soon as nbdkit has read them (at start-up,
before it creates its socket).

nbdkit runs with ``--exit-with-parent`` so a crashed daemon leaves no reader behind. Linux
implements that with PR_SET_PDEATHSIG, which fires when the *thread* that started nbdkit ends:
open the session on the thread that will also release it (the sync job's thread), never on a
short-lived helper thread.

Zero detection happens on the data read, in the copier (appliance/datapath/copier.py sends
all-zero reads as NBD zero requests); CBT's "*" query already leaves unallocated areas out.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from appliance.sources.vsphere import tls
from appliance.sources.vsphere.client import Secret
from appliance.sources.vsphere.errors import DatastoreReadError, VSphereError

log = logging.getLogger(__name__)

START_TIMEOUT = 30.0  # seconds for nbdkit to open the plugin and create its socket
CURL_TIMEOUT = 120  # seconds per HTTP request; a 32 MiB range over a slow WAN link
# The retry filter reopens the plugin (new HTTP connection) after a failed request; a few
# short retries ride over a dropped connection, a permanent failure still surfaces quickly.
RETRIES = 3
RETRY_DELAY = 2  # seconds
_RETRY_PARAMS = [f"retries={RETRIES}", f"retry-delay={RETRY_DELAY}", "retry-exponential=no"]
PLUGIN = Path(__file__).with_name("https_plugin.py")
MAX_SOCKET_PATH = 107  # bytes: sizeof(sockaddr_un.sun_path) - 1 on Linux


def folder_url(host: str, port: int, datacenter: str, datastore: str, path: str) -> str:
    """The datastore HTTP endpoint URL of a file: /folder/<path>?dcPath=..&dsName=.."""
    q = urllib.parse.urlencode({"dcPath": datacenter, "dsName": datastore})
    netloc = host if port == 443 else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        netloc = f"[{host}]" if port == 443 else f"[{host}]:{port}"
    return f"https://{netloc}/folder/{urllib.parse.quote(path)}?{q}"


def check_readable(url: str, cookie: Secret, ctx: ssl.SSLContext, size: int) -> None:
    """One 1-byte Range GET through the same trust the reader will apply. Raises with the
    reason.

    Catches, before any snapshot or copy: a datastore the endpoint cannot serve (404, 403), a
    host name the certificate does not carry (libcurl verifies it in CA mode), a file shorter
    than the disk, a server that ignores Range.
    """
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(u.hostname or "", u.port or 443, context=ctx, timeout=60)
    path = u.path + ("?" + u.query if u.query else "")
    try:
        conn.request(
            "GET",
            path,
            headers={"Cookie": cookie.reveal(), "Range": f"bytes={size - 1}-{size - 1}"},
        )
        r = conn.getresponse()
        r.read()
    except ssl.SSLCertVerificationError as e:
        raise DatastoreReadError(
            f"{u.hostname}: the datastore endpoint's certificate fails verification "
            f"({e.verify_message})",
            hint="register the endpoint under a name the certificate carries, or pin the "
            "certificate's fingerprint instead of trusting CAs",
        ) from e
    except (OSError, http.client.HTTPException) as e:
        raise DatastoreReadError(f"{u.hostname}: datastore endpoint unreachable: {e}") from e
    finally:
        conn.close()
    if r.status == 404:
        raise DatastoreReadError(
            f"{urllib.parse.unquote(u.path)}: not found on the datastore endpoint",
            hint="the disk is not a flat VMDK on a datastore this endpoint serves (vSAN, vVols "
            "and NFS-backed templates need the VDDK reader)",
        )
    if r.status in (401, 403):
        raise DatastoreReadError(
            f"{urllib.parse.unquote(u.path)}: access refused ({r.status})",
            hint="the account needs the Datastore.Browse privilege on this datastore",
        )
    if r.status != 206:
        raise DatastoreReadError(
            f"{urllib.parse.unquote(u.path)}: a Range read returned HTTP {r.status}, expected 206 "
            f"(file shorter than the disk's {size} bytes, or Range unsupported)"
        )


def _write_secret(directory: Path, name: str, secret: Secret) -> Path:
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.reveal())
    return path


@dataclass
class NbdkitExport:
    """A running nbdkit serving one disk read-only on a unix socket."""

    label: str
    argv: list[str]
    workdir: Path
    size: int
    secrets: list[Path] = field(default_factory=list)  # files to shred once nbdkit is up
    proc: subprocess.Popen[bytes] | None = None
    own_workdir: bool = True
    # What the secret files hold, kept in memory to restart nbdkit after it died.
    secret_values: dict[Path, Secret] = field(default_factory=dict, repr=False)
    restarts: int = 0

    @property
    def socket(self) -> Path:
        return self.workdir / "nbd.sock"

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "nbdkit.log"

    def start(self) -> NbdkitExport:
        with open(self.log_path, "ab") as errlog:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=errlog, stderr=errlog
            )
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while not self.socket.exists():
                if self.proc.poll() is not None:
                    raise DatastoreReadError(
                        f"{self.label}: nbdkit exited at start ({self._log_tail()})"
                    )
                if time.monotonic() > deadline:
                    raise DatastoreReadError(
                        f"{self.label}: nbdkit did not start within {START_TIMEOUT:.0f} s"
                    )
                time.sleep(0.02)
        except BaseException:
            self.close()
            raise
        finally:
            self._shred_secrets()
        log.info("%s: serving on %s (pid %s)", self.label, self.socket, self.proc.pid)
        return self

    def _shred_secrets(self) -> None:
        for p in self.secrets:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self.secrets.clear()

    def _log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " | ".join(lines[-3:]) or "no output"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart_if_dead(self) -> bool:
        """Start nbdkit again on the same socket if it exited (killed, crashed).

        The copier reconnects to the same URI after a dropped connection (reliability row 3),
        so a restarted reader lets the sync go on instead of failing. Returns True when it
        restarted. Raises DatastoreReadError when the restart fails.
        """
        if self.proc is None or self.alive() or not self.workdir.exists():
            return False
        log.warning(
            "%s: nbdkit exited (status %s); restarting it on %s",
            self.label,
            self.proc.returncode,
            self.socket,
        )
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()
        for path, secret in self.secret_values.items():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            _write_secret(path.parent, path.name, secret)
        self.secrets = list(self.secret_values)
        self.start()
        self.restarts += 1  # counted once it serves again
        return True

    def close(self) -> None:
        """Stop nbdkit (SIGTERM, then SIGKILL) and remove the socket and secrets. Idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._shred_secrets()
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> NbdkitExport:
        return self if self.proc else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _workdir(run_dir: Path | None, label: str) -> Path:
    """A 0700 directory for one export's socket, secrets and log.

    Unix socket paths are limited to 107 bytes; when ``run_dir`` is too deep for that, the
    directory goes to the system temporary directory instead (still 0700), with a warning.
    """
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if len(str(run_dir)) + len("/vs-XXXXXXXX/nbd.sock") > MAX_SOCKET_PATH:
            log.warning("%s: %s is too deep for a unix socket; using %s", label, run_dir,
                        tempfile.gettempdir())  # fmt: skip
            run_dir = None
    return Path(tempfile.mkdtemp(prefix="vs-", dir=run_dir))


def curl_export(
    *,
    label: str,
    url: str,
    size: int,
    cookie: Secret,
    policy: tls.TlsPolicy,
    run_dir: Path | None = None,
    filters: list[str] | None = None,
) -> NbdkitExport:
    """nbdkit curl on one datastore file, for TLS modes "ca" and "insecure" (not started)."""
    if policy.mode == "pinned":
        raise VSphereError(f"{label}: a pinned endpoint is read by pinned_export, not libcurl")
    work = _workdir(run_dir, label)
    cookie_file = _write_secret(work, "cookie", cookie)
    params = [f"url={url}", f"cookie=+{cookie_file}", f"timeout={CURL_TIMEOUT}"]
    if policy.mode == "insecure":
        params.append("sslverify=false")
    elif policy.cafile:
        params.append(f"cainfo={policy.cafile}")
    argv = [
        "nbdkit",
        "--exit-with-parent",
        "--foreground",
        "--readonly",
        "--unix",
        str(work / "nbd.sock"),
        "--filter=retry",
        *[f"--filter={f}" for f in (filters or [])],
        "curl",
        *params,
        *_RETRY_PARAMS,
    ]
    return NbdkitExport(
        label=label,
        argv=argv,
        workdir=work,
        size=size,
        secrets=[cookie_file],
        secret_values={cookie_file: cookie},
    )


def pinned_export(
    *,
    label: str,
    url: str,
    size: int,
    cookie: Secret,
    sha256: str,
    run_dir: Path | None = None,
    filters: list[str] | None = None,
) -> NbdkitExport:
    """nbdkit python + https_plugin.py on one datastore file, trusted by its SHA-256 pin."""
    work = _workdir(run_dir, label)
    cookie_file = _write_secret(work, "cookie", cookie)
    argv = [
        "nbdkit",
        "--exit-with-parent",
        "--foreground",
        "--readonly",
        "--unix",
        str(work / "nbd.sock"),
        *[f"--filter={f}" for f in (filters or [])],
        "python",
        str(PLUGIN),
        f"url={url}",
        f"cookiefile={cookie_file}",
        f"sha256={sha256}",
        f"size={size}",
        f"timeout={CURL_TIMEOUT}",
        f"retries={RETRIES}",
        f"retry-delay={RETRY_DELAY}",  # the plugin retries itself: requests stay parallel
    ]
    return NbdkitExport(
        label=label,
        argv=argv,
        workdir=work,
        size=size,
        secrets=[cookie_file],
        secret_values={cookie_file: cookie},
    )


def datastore_export(
    *,
    label: str,
    url: str,
    size: int,
    cookie: Secret,
    policy: tls.TlsPolicy,
    run_dir: Path | None = None,
    filters: list[str] | None = None,
) -> NbdkitExport:
    """The datastore HTTPS reader for this trust policy: pinned -> own reader, else libcurl."""
    if policy.mode == "pinned":
        assert policy.sha256 is not None
        return pinned_export(
            label=label,
            url=url,
            size=size,
            cookie=cookie,
            sha256=policy.sha256,
            run_dir=run_dir,
            filters=filters,
        )
    return curl_export(
        label=label, url=url, size=size, cookie=cookie, policy=policy, run_dir=run_dir,
        filters=filters,
    )  # fmt: skip


def vddk_available(libdir: str) -> bool:
    """VDDK is usable when nbdkit has the vddk plugin and libdir holds libvixDiskLib."""
    lib = Path(libdir)
    if not any(lib.glob("lib64/libvixDiskLib.so*")):
        return False
    r = subprocess.run(
        ["nbdkit", "vddk", f"libdir={libdir}", "--dump-plugin"], capture_output=True, check=False
    )
    return r.returncode == 0


def sha1_thumbprint(der: bytes) -> str:
    """VDDK's thumbprint format (SHA-1, colon separated). Only ever of a certificate Ferryman
    has already verified by its SHA-256 pin or by the system CAs."""
    return ":".join(f"{b:02X}" for b in hashlib.sha1(der).digest())


def vddk_export(
    *,
    label: str,
    libdir: str,
    server: str,
    user: str,
    password: Secret,
    thumbprint: str,
    vm_moref: str,
    snapshot_moref: str,
    file: str,
    size: int,
    transports: str = "nbdssl",
    run_dir: Path | None = None,
) -> NbdkitExport:
    """An nbdkit vddk export of one disk of a snapshot (not started; use ``.start()``).

    Untested here (VDDK is VMware's and not redistributable); docs/vsphere.md says how to
    check it on site.
    """
    work = _workdir(run_dir, label)
    pw = _write_secret(work, "password", password)
    argv = [
        "nbdkit",
        "--exit-with-parent",
        "--foreground",
        "--readonly",
        "--unix",
        str(work / "nbd.sock"),
        "vddk",
        f"libdir={libdir}",
        f"server={server}",
        f"user={user}",
        f"password=+{pw}",
        f"thumbprint={thumbprint}",
        f"vm=moref={vm_moref}",
        f"snapshot={snapshot_moref}",
        f"transports={transports}",
        f"file={file}",
    ]
    return NbdkitExport(
        label=label, argv=argv, workdir=work, size=size, secrets=[pw], secret_values={pw: password}
    )
