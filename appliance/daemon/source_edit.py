"""Change a registered source in place: name, address, login, throttle, TLS options.

Every field is checked first and every bad one is reported, one line each, before anything
is reached or written. A changed endpoint (scheme, host or port) drops what was pinned for
the old one: a vSphere certificate no system CA vouches for, or an agent's SSH host key, must
be confirmed again. The source is then tested with the new settings (unless asked not to)
and only then saved; a changed login is encrypted again under a fresh token and the old
credential row is deleted in the same transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlite_utils import Database

from appliance import inventory
from appliance.errors import Conflict
from appliance.sources.registry import confirm_host_key, make_adapter, ssh_host_key, tls_probe
from store.db import dumps, now, write_txn
from store.secrets import Vault

MAX_URI = 1024  # characters; the same limits as when a source is added
MAX_USER = 256
MAX_SECRET = 4096
MIN_THROTTLE_BPS = 65536  # below 64 KiB/s a sync never ends; the machine setting has the same


@dataclass
class Edit:
    """What the operator asked to change; None leaves a field as it is."""

    name: str | None = None
    uri: str | None = None
    username: str | None = None
    password: str | None = None
    params: dict[str, Any] | None = None  # merged into the old ones; a None value removes a key
    throttle_bps: int | None = None
    clear_throttle: bool = False
    thumbprint: str | None = None
    insecure: bool | None = None
    test: bool = True


def endpoint(uri: str) -> tuple[str, str, int | None]:
    u = urlsplit(uri if "://" in uri else "ssh://" + uri)
    try:
        port = u.port
    except ValueError:
        port = None
    return u.scheme, (u.hostname or "").lower(), port


def problems(src: dict[str, Any], e: Edit) -> list[str]:
    """One line per bad field: 'FIELD: what is wrong -> the fix'."""
    out: list[str] = []
    if e.name is not None and not inventory.NAME_RE.match(e.name):
        out.append(
            f"name: '{e.name}' is not valid -> 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if e.uri is not None:
        uri = e.uri.strip()
        schemes = inventory.SCHEMES[src["kind"]]
        if not uri:
            out.append("uri: empty -> give the address, e.g. " + schemes[0] + "://HOST")
        elif len(uri) > MAX_URI:
            out.append(f"uri: {len(uri)} characters -> at most {MAX_URI}")
        elif urlsplit(uri).scheme not in schemes:
            out.append(
                f"uri: '{uri}' is not a {src['kind']} address -> it must start with "
                + " or ".join(s + "://" for s in schemes)
            )
        else:
            try:
                _ = urlsplit(uri).port
            except ValueError:
                out.append(f"uri: the port of '{uri}' is not a number -> 1 to 65535")
    if e.username is not None and len(e.username) > MAX_USER:
        out.append(f"user: {len(e.username)} characters -> at most {MAX_USER}")
    if e.password is not None:
        if not e.password:
            out.append("password: empty -> give the new one, or leave it out to keep the old")
        elif len(e.password) > MAX_SECRET:
            out.append(f"password: {len(e.password)} characters -> at most {MAX_SECRET}")
    if e.throttle_bps is not None and e.clear_throttle:
        out.append("throttle: a new rate and 'no throttle' at once -> give only one")
    elif e.throttle_bps is not None and e.throttle_bps < MIN_THROTTLE_BPS:
        out.append(
            f"throttle: {e.throttle_bps} bytes/s is too slow for a sync to end -> "
            f"at least {MIN_THROTTLE_BPS} (64KiB)"
        )
    if e.thumbprint is not None:
        hexa = e.thumbprint.replace(":", "").lower()
        if src["kind"] != "vsphere":
            out.append(f"thumbprint: a {src['kind']} source pins no certificate -> leave it out")
        elif len(hexa) != 64 or any(c not in "0123456789abcdef" for c in hexa):
            out.append(
                "thumbprint: not a SHA-256 fingerprint -> 64 hex digits (colons allowed), "
                "as ferryman source tls URI shows"
            )
    if e.insecure and src["kind"] not in ("vsphere", "nbd"):
        out.append(f"insecure: a {src['kind']} source has no such option -> leave it out")
    for k in e.params or {}:
        if k in ("throttle_bps", "password", "secret"):
            out.append(f"param {k}: not a parameter -> use its own option")
    return out


def apply(db: Database, vault: Vault, name: str, e: Edit) -> tuple[dict[str, Any], list[str], bool]:
    """Checks, confirmation of a changed endpoint, test, then the write.

    Returns the source row as saved, the names of the fields that changed and whether the
    endpoint changed. Raises InventoryError (bad fields, one line each), Conflict (a
    certificate or host key to confirm; a name taken) or the adapter's own error (test)."""
    src = inventory.source_row(db, name)
    bad = problems(src, e)
    if bad:
        raise inventory.InventoryError(
            f"source '{src['name']}' was not changed; "
            f"{len(bad)} field{'s are' if len(bad) > 1 else ' is'} wrong:\n  " + "\n  ".join(bad),
            hint="fix them and run the edit again; nothing was sent or saved",
        )
    new = dict(src)
    new["params"] = dict(src["params"])
    changed: list[str] = []
    if e.name is not None and e.name != src["name"]:
        if db.execute("SELECT 1 FROM sources WHERE name=?", [e.name]).fetchone():
            raise Conflict(
                f"a source named '{e.name}' already exists",
                hint="choose another name for the edit",
            )
        new["name"] = e.name
        changed.append("name")
    if e.uri is not None and e.uri.strip() != src["uri"]:
        new["uri"] = e.uri.strip()
        changed.append("uri")
    if e.insecure is not None and bool(e.insecure) != bool(src["insecure"]):
        new["insecure"] = bool(e.insecure)
        changed.append("insecure")
    for k, v in (e.params or {}).items():
        if new["params"].get(k) != v:
            if v is None:
                new["params"].pop(k, None)
            else:
                new["params"][k] = v
            changed.append(f"param {k}")
    if e.clear_throttle and "throttle_bps" in new["params"]:
        del new["params"]["throttle_bps"]
        changed.append("throttle")
    elif e.throttle_bps is not None and new["params"].get("throttle_bps") != e.throttle_bps:
        new["params"]["throttle_bps"] = e.throttle_bps
        changed.append("throttle")
    moved = endpoint(new["uri"]) != endpoint(src["uri"])
    if moved:
        new["tls_thumbprint"] = None  # pinned for the old endpoint only
        if src["kind"] == "linux-agent" and "host_key" not in (e.params or {}):
            new["params"].pop("host_key", None)
    if e.thumbprint is not None and e.thumbprint != src["tls_thumbprint"]:
        new["tls_thumbprint"] = e.thumbprint
        changed.append("thumbprint")
    elif moved and src["tls_thumbprint"]:
        changed.append("thumbprint")
    inventory.validate_source(src["kind"], new["uri"], insecure=bool(new["insecure"]))
    _confirmations(new)

    old_user, old_secret = ("", None)
    if src.get("credential_id"):
        old_user, old_secret = vault.get(db, int(src["credential_id"]))
    user = old_user if e.username is None else e.username
    secret = old_secret if e.password is None else e.password
    if e.username is not None and e.username != old_user:
        changed.append("user")
    if e.password is not None:
        changed.append("password")  # never compared, never shown
    if not changed:
        return inventory.list_sources_by_name(db, src["name"]), [], False

    if e.test:
        make_adapter(new, (lambda: secret) if secret else None, user or "").test()
    relabel = "name" in changed and src.get("credential_id")
    with write_txn(db):
        cred_id = src.get("credential_id")
        if secret is not None and ("user" in changed or "password" in changed or relabel):
            cred_id = vault.put(db, f"source {new['name']}", user or "", secret)
            if src.get("credential_id"):
                db.execute("UPDATE sources SET credential_id=? WHERE id=?", [cred_id, src["id"]])
                vault.delete(db, int(src["credential_id"]))
        elif "user" in changed and not secret:
            changed.remove("user")  # nothing to log in with: a user name alone is not kept
        db.execute(
            "UPDATE sources SET name=?, uri=?, params=?, credential_id=?, tls_thumbprint=?, "
            "insecure=?, updated_at=? WHERE id=?",
            [
                new["name"],
                new["uri"],
                dumps(new["params"]),
                cred_id,
                new["tls_thumbprint"],
                int(bool(new["insecure"])),
                now(),
                src["id"],
            ],
        )
    return inventory.list_sources_by_name(db, new["name"]), changed, moved


def _confirmations(new: dict[str, Any]) -> None:
    """What the operator must confirm for this endpoint before it is used."""
    if new["kind"] == "vsphere" and not (new["tls_thumbprint"] or new["insecure"]):
        cert = tls_probe(new["uri"])
        if not cert["verified_by_ca"]:
            raise Conflict(
                f"the certificate of {new['uri']} is not trusted by the system CAs "
                f"(SHA-256 {cert['thumbprint']})",
                hint="check it with the vCenter administrator, then edit the source again "
                "with --thumbprint " + cert["thumbprint"],
            )
    if new["kind"] == "linux-agent":
        # As at `source add`: a confirmed SHA256 fingerprint is matched against the key the
        # server presents and that key LINE is pinned (the adapter needs the line).
        given = new["params"].get("host_key")
        if not given:
            k = ssh_host_key(new["uri"])
            raise Conflict(
                f"{k['host']}:{k['port']} presents SSH host key {k['fingerprint']}, not yet "
                f"confirmed for source '{new['name']}'",
                hint="check it with the server's administrator (ssh-keygen -lf "
                "/etc/ssh/ssh_host_ed25519_key.pub), then edit the source again with "
                f"--param host_key={k['fingerprint']}",
            )
        new["params"]["host_key"] = confirm_host_key(new["uri"], str(given))
