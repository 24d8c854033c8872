"""A TLS endpoint with a self-signed certificate, as a fresh vCenter presents: for the
first-contact thumbprint confirmation (TUI form, source add and edit)."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def self_signed_tls(d: Path, cn: str = "vc-test.local") -> Iterator[tuple[int, str]]:
    """Serves TLS on a free 127.0.0.1 port; yields (port, SHA-256 of the certificate)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{cn}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / f"{cn}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / f"{cn}.pem", d / f"{cn}.key")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.settimeout(2)
                    tls.recv(1)
            except OSError:
                conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield (
            srv.getsockname()[1],
            hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest(),
        )
    finally:
        stop.set()
        t.join(5)
        srv.close()
