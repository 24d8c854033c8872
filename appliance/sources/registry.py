"""Build the adapter of a registered source from its store row.

Secrets come from the vault only here, at the moment an adapter needs them, and only as
callables: an adapter asks for the password when it logs in, so it never sits in an object
that could end up in a log or a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.config import paths
from appliance.errors import FerrymanError
from appliance.sources.base import SourceAdapter

SecretFn = Callable[[], str]


def make_adapter(src: dict[str, Any], secret: SecretFn | None, username: str = "") -> SourceAdapter:
    kind = src["kind"]
    params: dict[str, Any] = dict(src.get("params") or {})
    run_dir = paths().run_dir
    if kind == "nbd":
        from appliance.sources.nbd import NbdSource

        cfg = {"name": src["name"], **params}
        if "disks" not in cfg:
            cfg["uri"] = src["uri"]
        return NbdSource(cfg)  # type: ignore[return-value]
    if kind == "libvirt":
        from appliance.sources.libvirt import LibvirtSource

        return LibvirtSource(
            src["uri"],
            run_dir=run_dir / "backup",  # type: ignore[return-value]
            **params,
        )
    if kind == "vsphere":
        from appliance.sources.vsphere.client import Endpoint, Secret
        from appliance.sources.vsphere.source import VSphereSource
        from appliance.sources.vsphere.tls import TlsPolicy

        if secret is None:
            raise FerrymanError(
                f"source '{src['name']}' has no password stored",
                hint="remove it and add it again with its password",
            )
        if src.get("insecure"):
            policy = TlsPolicy(mode="insecure")
        elif src.get("tls_thumbprint"):
            policy = TlsPolicy(mode="pinned", sha256=src["tls_thumbprint"])
        else:
            policy = TlsPolicy(mode="ca")
        endpoint = Endpoint.from_url(src["uri"], username, policy)
        get = secret
        return VSphereSource(
            endpoint,
            lambda: Secret(get()),  # type: ignore[return-value]
            run_dir=run_dir / "vsphere",
            vddk_libdir=params.get("vddk_libdir"),
        )
    if kind == "linux-agent":
        raise FerrymanError(
            "linux-agent sources are not available in this version",
            hint="use an NBD export of the server's disk meanwhile",
        )
    raise FerrymanError(f"unknown source kind '{kind}'")


def tls_probe(uri: str) -> dict[str, Any]:
    """What a TLS endpoint presents, for the operator to confirm at first contact."""
    from appliance.sources.vsphere import tls

    u = urlsplit(uri if "://" in uri else "https://" + uri)
    if not u.hostname:
        raise FerrymanError(f"'{uri}' has no host name", hint="give https://HOST[:PORT]")
    cert = tls.probe(u.hostname, u.port or 443)
    return {
        "host": cert.host,
        "port": cert.port,
        "thumbprint": cert.sha256,
        "subject": cert.subject,
        "issuer": cert.issuer,
        "not_after": cert.not_after,
        "names": cert.names,
        "verified_by_ca": cert.trusted_by_system,
        "trust_error": cert.trust_error,
    }


_ = Path
