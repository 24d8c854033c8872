"""Build the adapter of a registered source from its store row.

Secrets come from the vault only here, at the moment an adapter needs them, and only as
callables: an adapter asks for the password when it logs in, so it never sits in an object
that could end up in a log or a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

from appliance.config import paths
from appliance.errors import Conflict, FerrymanError
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

        u = _ssh_uri(src["uri"])
        params = agent_params(params)
        if not params.get("host_key"):
            raise FerrymanError(
                f"source '{src['name']}' has no pinned SSH host key",
                hint="check it with: ferryman source hostkey URI, then add the source with "
                "--param host_key=SHA256:<the fingerprint>",
            )
        if secret is None and not params.get("key_file"):
            raise FerrymanError(
                f"source '{src['name']}' has no SSH key",
                hint="give --key-file KEYFILE (stored encrypted)",
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


def _ssh_uri(uri: str) -> SplitResult:
    u = urlsplit(uri if "://" in uri else "ssh://" + uri)
    if not u.hostname:
        raise FerrymanError(f"'{uri}' has no host name", hint="give ssh://USER@HOST[:PORT]")
    return u


def agent_params(params: dict[str, Any]) -> dict[str, Any]:
    """linux-agent params as the adapter takes them: ``--param volumes=vg0/root,vg0/var``
    arrives as one string (an empty one: no LV); a JSON list stays a list."""
    out = dict(params)
    for k in ("volumes", "live_devices"):
        v = out.get(k)
        if isinstance(v, str):
            out[k] = [x.strip() for x in v.split(",") if x.strip()]
    return out


def ssh_host_key(uri: str) -> dict[str, Any]:
    """The SSH host key a server presents, for the operator to confirm at first contact."""
    from appliance.sources.agent.ssh import scan_host_key

    u = _ssh_uri(uri)
    k = scan_host_key(u.hostname or "", u.port or 22)
    return {
        "host": u.hostname,
        "port": u.port or 22,
        "host_key": k.line,
        "fingerprint": k.fingerprint,
    }


def confirm_host_key(uri: str, given: str | None) -> str:
    """The host key LINE to pin for a new linux-agent source, like a TLS thumbprint: with no
    key given, refused with the fingerprint the server presents, for the operator to
    confirm; a confirmed fingerprint (``SHA256:...``) is matched against what the server
    presents now and its key is pinned; a whole key line is pinned as given (the
    registration test then proves the server holds it)."""
    from appliance.sources.agent.errors import AgentHostKeyChanged
    from appliance.sources.agent.ssh import HostKey

    given = (given or "").strip()
    if given and not given.startswith("SHA256:"):
        return HostKey.parse(given).line
    seen = ssh_host_key(uri)
    if not given:
        raise Conflict(
            f"{seen['host']}:{seen['port']} presents the SSH host key {seen['fingerprint']}, "
            "not confirmed yet",
            hint="compare it with ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub on the "
            f"server, then add the source again with --param host_key={seen['fingerprint']}",
        )
    if given.rstrip("=") != seen["fingerprint"]:
        raise AgentHostKeyChanged(
            f"{seen['host']}:{seen['port']} presents the SSH host key {seen['fingerprint']}, "
            f"not the confirmed {given}; nothing was sent to it",
            hint="the server's key is not the one you confirmed: check the address and the "
            "key with the server's administrator",
        )
    return str(seen["host_key"])


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
