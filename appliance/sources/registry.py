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
        from appliance.sources.agent.source import LinuxAgentSource

        u = urlsplit(src["uri"] if "://" in src["uri"] else "ssh://" + src["uri"])
        if not params.get("host_key"):
            raise FerrymanError(
                f"source '{src['name']}' has no pinned SSH host key",
                hint="check it with: ferryman source hostkey URI, then add the source with "
                "--param host_key='<the key line>'",
            )
        if secret is None and not params.get("key_file"):
            raise FerrymanError(
                f"source '{src['name']}' has no SSH key",
                hint="give --password-file KEYFILE (stored encrypted)",
            )
        identity: Any = secret if secret is not None else Path(params["key_file"])
        return LinuxAgentSource(  # type: ignore[return-value]
            host=u.hostname or "",
            port=u.port or 22,
            user=u.username or username or "root",
            identity=identity,
            host_key=params["host_key"],
            run_dir=run_dir / "agent",
            state_dir=paths().state_dir,
            volumes=params.get("volumes"),
            live_devices=params.get("live_devices"),
            snapshot_size=params.get("snapshot_size", "20%ORIGIN"),
            nbd_server=params.get("nbd_server", "auto"),
            name=src["name"],
        )
    raise FerrymanError(f"unknown source kind '{kind}'")


def ssh_host_key(uri: str) -> dict[str, Any]:
    """The SSH host key a server presents, for the operator to confirm at first contact."""
    from appliance.sources.agent.ssh import scan_host_key

    u = urlsplit(uri if "://" in uri else "ssh://" + uri)
    if not u.hostname:
        raise FerrymanError(f"'{uri}' has no host name", hint="give ssh://USER@HOST[:PORT]")
    k = scan_host_key(u.hostname, u.port or 22)
    return {
        "host": u.hostname,
        "port": u.port or 22,
        "host_key": k.line,
        "fingerprint": k.fingerprint,
    }


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
