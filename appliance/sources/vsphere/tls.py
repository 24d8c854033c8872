"""TLS trust for vCenter/ESXi: system CAs, a pinned SHA-256 fingerprint, or (only when asked
for) none.

Most ESXi hosts and many vCenters in the field present certificates that no system CA
signs. The operator then confirms the SHA-256 fingerprint once (shown by the CLI/TUI from
:func:`probe`, compared with the one on the vCenter console), and Ferryman pins it.

The pin is checked inside the TLS handshake of EVERY connection, before the first HTTP byte is
written (:class:`PinnedContext`), so a changed certificate is refused before the password or
session cookie ever leaves the appliance. pyVmomi's own ``thumbprint=`` is not used: it only
checks the pin when system-CA verification failed, so a CA-signed impostor would pass.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Literal

from appliance.sources.vsphere.errors import (
    CertificateChanged,
    VSphereUnreachable,
)

log = logging.getLogger(__name__)

Mode = Literal["ca", "pinned", "insecure"]
PROBE_TIMEOUT = 15.0  # seconds; a TLS handshake over a WAN link, not a data transfer


def format_fingerprint(digest: bytes) -> str:
    """32 bytes -> 'AB:CD:...' (upper case, colons), as vCenter and ESXi show it."""
    return ":".join(f"{b:02X}" for b in digest)


def normalize_fingerprint(text: str) -> str:
    """Accept 'ab:cd..', 'AB CD ..' or plain hex; return the canonical form or raise."""
    hexdigits = "".join(c for c in text if c not in ": -").lower()
    if len(hexdigits) != 64 or any(c not in "0123456789abcdef" for c in hexdigits):
        raise ValueError(
            f"not a SHA-256 fingerprint: {text!r} (expected 64 hex digits, e.g. AB:CD:...)"
        )
    return format_fingerprint(bytes.fromhex(hexdigits))


def fingerprint_of(der: bytes) -> str:
    return format_fingerprint(hashlib.sha256(der).digest())


@dataclass(frozen=True)
class TlsPolicy:
    """How an endpoint's certificate is trusted. Stored with the endpoint (no secret in it)."""

    mode: Mode = "ca"
    sha256: str | None = None  # the pinned fingerprint, canonical form, when mode == "pinned"
    cafile: str | None = None  # an extra CA bundle for mode "ca" (a private enterprise CA)

    def __post_init__(self) -> None:
        if self.mode == "pinned":
            if not self.sha256:
                raise ValueError("a pinned TLS policy needs the SHA-256 fingerprint")
            object.__setattr__(self, "sha256", normalize_fingerprint(self.sha256))
        elif self.mode not in ("ca", "insecure"):
            raise ValueError(f"unknown TLS mode {self.mode!r} (ca, pinned or insecure)")

    @classmethod
    def pinned(cls, sha256: str) -> TlsPolicy:
        return cls(mode="pinned", sha256=sha256)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "sha256": self.sha256, "cafile": self.cafile}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TlsPolicy:
        return cls(mode=d.get("mode", "ca"), sha256=d.get("sha256"), cafile=d.get("cafile"))


@dataclass(frozen=True)
class PresentedCertificate:
    """What a server presented, for the operator to confirm at first contact."""

    host: str
    port: int
    sha256: str
    pem: str
    subject: str = ""
    issuer: str = ""
    not_after: str = ""
    names: list[str] = field(default_factory=list)
    trusted_by_system: bool = False
    trust_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "sha256": self.sha256,
            "subject": self.subject,
            "issuer": self.issuer,
            "not_after": self.not_after,
            "names": self.names,
            "trusted_by_system": self.trusted_by_system,
            "trust_error": self.trust_error,
        }


def _describe(der: bytes) -> tuple[str, str, str, list[str]]:
    try:
        from cryptography import x509
    except ImportError:  # optional: the fingerprint alone is what the operator confirms
        return "", "", "", []
    try:
        cert = x509.load_der_x509_certificate(der)
        names: list[str] = []
        try:
            san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
            names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        except x509.ExtensionNotFound:
            pass
        # cryptography >= 42 has the timezone-aware property; Debian 12 ships 38.
        expiry = getattr(cert, "not_valid_after_utc", None) or cert.not_valid_after
        return (
            cert.subject.rfc4514_string(),
            cert.issuer.rfc4514_string(),
            expiry.isoformat(),
            names,
        )
    except ValueError:
        return "", "", "", []


def _handshake(host: str, port: int, ctx: ssl.SSLContext, timeout: float) -> bytes:
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
    except (ssl.SSLCertVerificationError, CertificateChanged):
        raise
    except (OSError, ssl.SSLError) as e:
        raise VSphereUnreachable(
            f"{host}:{port}: TLS connection failed: {e}",
            hint="check the address, port 443 reachability from the appliance and firewalls",
        ) from e
    if not der:
        raise VSphereUnreachable(f"{host}:{port}: server presented no certificate")
    return der


def probe(host: str, port: int = 443, *, timeout: float = PROBE_TIMEOUT) -> PresentedCertificate:
    """Read the certificate a server presents; send nothing else. For first contact."""
    der = _handshake(host, port, _unverified(), timeout)
    trusted, error = True, ""
    try:
        _handshake(host, port, ssl.create_default_context(), timeout)
    except ssl.SSLCertVerificationError as e:
        trusted, error = False, e.verify_message or str(e)
    subject, issuer, not_after, names = _describe(der)
    return PresentedCertificate(
        host=host,
        port=port,
        sha256=fingerprint_of(der),
        pem=ssl.DER_cert_to_PEM_cert(der),
        subject=subject,
        issuer=issuer,
        not_after=not_after,
        names=names,
        trusted_by_system=trusted,
        trust_error=error,
    )


def _unverified() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class PinnedContext(ssl.SSLContext):
    """An SSLContext that refuses, inside the handshake, any certificate but the pinned one.

    ``wrap_socket`` is what http.client (and so pyVmomi and urllib) calls right after the TCP
    connect; raising there means no request line, header, cookie or SOAP body is ever written.
    The last verified certificate is kept (``presented_der``) so the data path can hand the
    same certificate to libcurl as its only trust anchor.
    """

    endpoint: str
    expected: str
    presented_der: bytes

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        tls = super().wrap_socket(sock, *args, **kwargs)
        if not kwargs.get("do_handshake_on_connect", True):
            tls.do_handshake()
        der = tls.getpeercert(binary_form=True) or b""
        presented = fingerprint_of(der)
        if presented != self.expected:
            tls.close()
            log.warning(
                "%s: refused certificate %s (pinned %s)", self.endpoint, presented, self.expected
            )
            raise CertificateChanged(self.endpoint, self.expected, presented)
        self.presented_der = der
        return tls


def make_context(policy: TlsPolicy, endpoint: str) -> ssl.SSLContext:
    """The SSLContext for every control-plane connection to ``endpoint`` (host:port)."""
    if policy.mode == "pinned":
        assert policy.sha256 is not None
        ctx = PinnedContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # trust is the pin, checked in wrap_socket
        ctx.endpoint = endpoint
        ctx.expected = policy.sha256
        ctx.presented_der = b""
        return ctx
    if policy.mode == "insecure":
        log.warning("%s: TLS verification disabled by the operator (insecure mode)", endpoint)
        return _unverified()
    return ssl.create_default_context(cafile=policy.cafile)


def data_path_context(policy: TlsPolicy, endpoint: str) -> ssl.SSLContext:
    """A context that trusts exactly what the data-path reader will trust.

    Pinned: the fingerprint, as on the control plane (the pinned reader checks it per
    connection). CA: chain and host name, as libcurl does. Preflight reads through this, so a
    mismatch is found before any snapshot, not mid-copy.
    """
    return make_context(policy, endpoint)
