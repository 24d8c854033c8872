"""The schema, one migration per change (sqlite-utils Migrations).

Never edit an applied migration: add a new function below. The names are the schema's
version history; a store that holds a name this code does not know was written by a newer
Ferryman and is refused (see store.db.open_store).
"""

from __future__ import annotations

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

MIGRATION_SET = "ferryman"
migrations = Migrations(MIGRATION_SET)


def _run(db: Database, script: str) -> None:
    """Run statements one by one: executescript() would COMMIT the migration's transaction."""
    for statement in script.split(";\n"):
        if statement.strip():
            db.execute(statement)


@migrations()
def m001_initial(db: Database) -> None:
    _run(
        db,
        """
        CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,            -- JSON
            updated_at TEXT NOT NULL
        );
        CREATE TABLE sources (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL CHECK (kind IN ('libvirt','nbd','vsphere','linux-agent')),
            uri TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',     -- JSON, never secrets
            credential_id INTEGER REFERENCES credentials(id),
            tls_thumbprint TEXT,                   -- pinned SHA-256, confirmed by an operator
            insecure INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE credentials (
            id INTEGER PRIMARY KEY,
            label TEXT NOT NULL,
            username TEXT NOT NULL DEFAULT '',
            secret BLOB NOT NULL,                  -- encrypted (store.secrets), never clear text
            created_at TEXT NOT NULL
        );
        CREATE TABLE machines (
            id INTEGER PRIMARY KEY,
            source_id INTEGER NOT NULL REFERENCES sources(id) ON DELETE CASCADE,
            ref TEXT NOT NULL,                     -- source-side identity
            name TEXT NOT NULL,
            power_state TEXT NOT NULL DEFAULT 'unknown',
            guest_os TEXT NOT NULL DEFAULT '',
            cpus INTEGER NOT NULL DEFAULT 0,
            memory_mib INTEGER NOT NULL DEFAULT 0,
            firmware TEXT NOT NULL DEFAULT '',
            nics TEXT NOT NULL DEFAULT '[]',
            details TEXT NOT NULL DEFAULT '{}',
            protected INTEGER NOT NULL DEFAULT 0,
            rpo_seconds INTEGER,                   -- target; NULL = no continuous protection
            throttle_bps INTEGER,                  -- NULL = unlimited
            verify_every_sync INTEGER NOT NULL DEFAULT 0,
            cutover_done INTEGER NOT NULL DEFAULT 0,
            discovered_at TEXT NOT NULL,
            UNIQUE (source_id, ref)
        );
        CREATE UNIQUE INDEX machines_name ON machines(name);
        CREATE TABLE disks (
            id INTEGER PRIMARY KEY,
            machine_id INTEGER NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
            key TEXT NOT NULL,
            size INTEGER NOT NULL,
            label TEXT NOT NULL DEFAULT '',
            details TEXT NOT NULL DEFAULT '{}',
            UNIQUE (machine_id, key)
        );
        CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL,
            machine_id INTEGER REFERENCES machines(id) ON DELETE SET NULL,
            plan_run_id INTEGER,
            state TEXT NOT NULL CHECK (state IN
                ('queued','running','succeeded','failed','cancelled','interrupted')),
            params TEXT NOT NULL DEFAULT '{}',
            progress TEXT NOT NULL DEFAULT '{}',
            result TEXT,
            error TEXT,
            requested_by TEXT NOT NULL DEFAULT '',
            origin TEXT NOT NULL DEFAULT '',
            daemon_pid INTEGER,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            started_at TEXT,
            ended_at TEXT
        );
        CREATE INDEX jobs_state ON jobs(state);
        CREATE INDEX jobs_machine ON jobs(machine_id, id);
        CREATE TABLE sync_sessions (
            id INTEGER PRIMARY KEY,
            machine_id INTEGER NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
            job_id INTEGER REFERENCES jobs(id) ON DELETE SET NULL,
            snapshot_id TEXT NOT NULL,             -- identity of the frozen source state
            parent_rp_id INTEGER REFERENCES restore_points(id),
            full INTEGER NOT NULL,
            reason TEXT NOT NULL DEFAULT '',
            state TEXT NOT NULL CHECK (state IN ('copying','sealed','failed','abandoned')),
            bytes_read INTEGER NOT NULL DEFAULT 0,
            bytes_written INTEGER NOT NULL DEFAULT 0,
            started_at TEXT NOT NULL,
            ended_at TEXT
        );
        -- The journal: an extent is recorded only after the target flush that covers it.
        CREATE TABLE sync_extents (
            session_id INTEGER NOT NULL REFERENCES sync_sessions(id) ON DELETE CASCADE,
            disk_key TEXT NOT NULL,
            offset INTEGER NOT NULL,
            length INTEGER NOT NULL,
            PRIMARY KEY (session_id, disk_key, offset)
        );
        CREATE TABLE restore_points (
            id INTEGER PRIMARY KEY,
            machine_id INTEGER NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
            session_id INTEGER REFERENCES sync_sessions(id),
            parent_id INTEGER REFERENCES restore_points(id),
            snapshot_id TEXT NOT NULL,
            source_time TEXT NOT NULL,             -- when the source snapshot was taken
            sealed_at TEXT NOT NULL,
            consistency TEXT NOT NULL,
            full INTEGER NOT NULL,
            token TEXT NOT NULL DEFAULT '{}',      -- commit token, persisted after sealing
            state TEXT NOT NULL DEFAULT 'sealed' CHECK (state IN ('sealed','merged','deleted')),
            verified TEXT,                         -- NULL | 'ok' | 'mismatch'
            verified_at TEXT,
            boot_verified TEXT,                    -- NULL | 'bootable' | 'not-bootable'
            inspection TEXT,                       -- JSON from appliance.convert
            bytes_written INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX restore_points_machine ON restore_points(machine_id, id);
        CREATE TABLE restore_point_disks (
            restore_point_id INTEGER NOT NULL REFERENCES restore_points(id) ON DELETE CASCADE,
            disk_key TEXT NOT NULL,
            path TEXT NOT NULL,
            size INTEGER NOT NULL,
            manifest TEXT,                         -- path of the block-hash manifest
            PRIMARY KEY (restore_point_id, disk_key)
        );
        CREATE TABLE plans (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            document TEXT NOT NULL,                -- JSON
            created_at TEXT NOT NULL,
            created_by TEXT NOT NULL DEFAULT '',
            UNIQUE (name, version)
        );
        CREATE TABLE plan_runs (
            id INTEGER PRIMARY KEY,
            plan_id INTEGER NOT NULL REFERENCES plans(id),
            kind TEXT NOT NULL CHECK (kind IN ('test','cutover')),
            state TEXT NOT NULL,
            step TEXT NOT NULL DEFAULT '',
            started_at TEXT NOT NULL,
            ended_at TEXT,
            report TEXT                            -- JSON
        );
        CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            level TEXT NOT NULL CHECK (level IN ('info','warning','error')),
            kind TEXT NOT NULL,                    -- 'job', 'sync', 'daemon', ...
            machine_id INTEGER,
            job_id INTEGER,
            message TEXT NOT NULL,
            details TEXT NOT NULL DEFAULT '{}'
        );
        CREATE INDEX events_machine ON events(machine_id, id);
        -- Append-only, hash-chained: hash = sha256(prev_hash || canonical row).
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            ts TEXT NOT NULL,
            who TEXT NOT NULL,
            origin TEXT NOT NULL,                  -- 'console', 'ssh:10.0.0.5', 'api'
            action TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',     -- never secrets
            result TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        );
        """,
    )


@migrations()
def m004_boot_verify(db: Database) -> None:
    """Boot-verified and pre-converted restore points (appliance/bootverify.py)."""
    _run(
        db,
        """
        ALTER TABLE restore_points ADD COLUMN boot_verified_at TEXT;
        -- JSON: job, reason, seconds, console log path, checks; or {"skipped": why}
        ALTER TABLE restore_points ADD COLUMN boot_report TEXT;
        -- 'off' | 'every-sync' | 'schedule' (every boot_verify_every_s seconds)
        ALTER TABLE machines ADD COLUMN boot_verify TEXT NOT NULL DEFAULT 'off';
        ALTER TABLE machines ADD COLUMN boot_verify_every_s INTEGER;
        -- The converted overlays kept of the newest bootable point of each machine ('current')
        -- and the previous ones waiting until nothing reads them any more ('retired').
        CREATE TABLE preconverted (
            id INTEGER PRIMARY KEY,
            machine_id INTEGER NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
            restore_point_id INTEGER NOT NULL REFERENCES restore_points(id),
            state TEXT NOT NULL CHECK (state IN ('current','retired')),
            disks TEXT NOT NULL,          -- JSON [{disk_key, path, chain, point, reader}]
            backend TEXT NOT NULL,
            custom_key TEXT NOT NULL,     -- hash of the conversion's plan customisation
            plan TEXT,                    -- the plan whose customisation was applied
            convert_seconds REAL,
            boot_seconds REAL,
            created_at TEXT NOT NULL
        );
        CREATE UNIQUE INDEX preconverted_current ON preconverted(machine_id)
            WHERE state='current';
        """,
    )
