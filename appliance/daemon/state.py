"""What the API handlers share: the store, the job runner, the probe verdict."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance import inventory
from appliance.config import paths
from appliance.daemon.jobs import JobRunner
from appliance.errors import Conflict, NotFound
from appliance.sources.base import SourceAdapter
from appliance.sources.registry import agent_params, confirm_host_key, make_adapter, tls_probe
from store.db import now, schema_version, write_txn
from store.records import add_event, audit, events, get_setting
from store.secrets import KEY_NAME, Vault


def adapter_for(db: Database, src: dict[str, Any]) -> SourceAdapter:
    """The adapter of a source row; its password is read from the vault only when used."""
    cred_id = src.get("credential_id")
    if not cred_id:
        return make_adapter(src, None, "")
    vault = Vault(paths().db.parent / KEY_NAME)
    username, _ = vault.get(db, cred_id)
    return make_adapter(src, lambda: vault.get(db, cred_id)[1], username)


class DaemonState:
    def __init__(
        self, db_path: Path, db_factory: Callable[[], Database], runner: JobRunner
    ) -> None:
        self.db_path = db_path
        self.db_factory = db_factory
        self.runner = runner
        self.pid = os.getpid()
        self.started_at = now()
        self._local = threading.local()
        self.schema = schema_version(self.db)
        self.vault = Vault(db_path.parent / KEY_NAME)
        self.paths = paths()

    @property
    def db(self) -> Database:
        """One connection per thread (API handlers run in a thread pool)."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._local.db = self.db_factory()
        return db

    def machine_id(self, machine: str) -> int:
        row = self.db.execute(
            "SELECT id FROM machines WHERE name = ? OR CAST(id AS TEXT) = ?", [machine, machine]
        ).fetchone()
        if row is None:
            raise NotFound(f"no machine '{machine}'", hint="list machines with: ferryman machines")
        return int(row[0])

    # -- sources -----------------------------------------------------------------------

    def adapter(self, name: str) -> SourceAdapter:
        return adapter_for(self.db, inventory.source_row(self.db, name))

    def add_source(self, req: Any) -> dict[str, Any]:
        inventory.validate_name(req.name, "source")
        inventory.validate_source(req.kind, req.uri, insecure=req.insecure)
        if req.kind == "vsphere" and not req.password:
            raise inventory.InventoryError(
                f"source '{req.name}' needs a password", hint="give the vCenter user's password"
            )
        if req.kind == "vsphere" and not (req.thumbprint or req.insecure):
            cert = tls_probe(req.uri)
            if not cert["verified_by_ca"]:
                raise Conflict(
                    f"the certificate of {req.uri} is not trusted by the system CAs "
                    f"(SHA-256 {cert['thumbprint']})",
                    hint="check it with the vCenter administrator, then add the source again "
                    "with --thumbprint " + cert["thumbprint"],
                )
        if req.kind == "linux-agent":
            if not req.password and not req.params.get("key_file"):
                raise inventory.InventoryError(
                    f"source '{req.name}' needs an SSH private key",
                    hint="give --key-file FILE (stored encrypted; never on the command line)",
                )
            # Pinned like a TLS thumbprint: the first add shows the fingerprint to confirm.
            req.params = agent_params(req.params)
            req.params["host_key"] = confirm_host_key(req.uri, req.params.get("host_key"))
        if req.test:
            src = {
                "name": req.name,
                "kind": req.kind,
                "uri": req.uri,
                "params": req.params,
                "tls_thumbprint": req.thumbprint,
                "insecure": req.insecure,
            }
            pw = req.password
            make_adapter(src, (lambda: pw) if pw else None, req.username or "").test()
        cred_id = None
        with write_txn(self.db):
            if req.password:
                cred_id = self.vault.put(
                    self.db, f"source {req.name}", req.username or "", req.password
                )
            row = inventory.insert_source(
                self.db,
                name=req.name,
                kind=req.kind,
                uri=req.uri,
                params=req.params,
                credential_id=cred_id,
                thumbprint=req.thumbprint,
                insecure=req.insecure,
            )
        if req.insecure:
            what = "no certificate check" if req.kind == "vsphere" else "no TLS"
            add_event(
                self.db,
                f"source {req.name} added in INSECURE mode ({what})",
                level="warning",
                kind="source",
            )
        return inventory.list_sources_by_name(self.db, row["name"])

    def source_edited(self, src: dict[str, Any], changed: list[str], moved: bool, who: str) -> None:
        """An event for the operators, and the new throttle for syncs already running."""
        level = "warning" if moved or src["insecure"] else "info"
        note = " (new endpoint)" if moved else ""
        if src["insecure"]:
            note += " INSECURE: no certificate check" if src["kind"] == "vsphere" else " no TLS"
        add_event(
            self.db,
            f"source {src['name']} edited by {who}: {', '.join(changed)}{note}",
            level=level,
            kind="source",
        )
        if "throttle" in changed:
            ids = self.db.execute("SELECT id FROM machines WHERE source_id=?", [src["id"]])
            for (mid,) in ids.fetchall():
                self.runner.set_live(mid, source_throttle_bps=src["params"].get("throttle_bps"))

    def tls_probe(self, uri: str) -> dict[str, Any]:
        return tls_probe(uri)

    def protect(self, name: str, req: Any) -> dict[str, Any]:
        m = inventory.machine_row(self.db, name)
        src = inventory.source_row(self.db, str(m["source_id"]))
        adapter = adapter_for(self.db, src)
        prepare = getattr(adapter, "protect", None)
        if prepare is not None and not m["protected"]:
            # vSphere: preflight (snapshots, independent disks, RDMs, storage) refuses with
            # every reason; then CBT is enabled, with the snapshot a running VM needs for it.
            result = prepare(m["ref"])
            for line in getattr(result, "events", []) or []:
                add_event(self.db, f"{m['name']}: {line}", kind="protect", machine_id=m["id"])
        return inventory.set_protection(
            self.db,
            str(m["id"]),
            protected=True,
            rpo_seconds=req.rpo_seconds,
            throttle_bps=req.throttle_bps,
            verify_every_sync=req.verify_every_sync,
        )

    def delete_restore_point(self, rp_id: int) -> dict[str, Any]:
        from appliance import replication

        return replication.delete_restore_point(self.db, rp_id)

    def probe_verdict(self) -> dict[str, Any] | None:
        v: dict[str, Any] | None = get_setting(self.db, "probe")
        return v

    def events(self, **kw: Any) -> list[dict[str, Any]]:
        return events(self.db, **kw)

    def audit(
        self, who: str, origin: str, action: str, params: dict[str, Any], result: str
    ) -> None:
        audit(self.db, who, origin, action, params, result)
