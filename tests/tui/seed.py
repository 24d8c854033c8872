"""A store with a realistic appliance state at a fixed instant, for the TUI's pilot and
snapshot tests, the tmux/SSH test and the benchmarks.

Restore points, sync history, plans and plan runs are written straight into the store: the
replication engine and the plan runner (issues 3 and 6) are what would write them, and the
TUI only reads them. Sources and protection go through the API where a test exercises them.
Timestamps are fixed (NOW) so that snapshots are the same on every run.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from store.db import open_store

NOW = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)
GiB = 1024**3


def ts(minutes_ago: float) -> str:
    return (NOW - timedelta(minutes=minutes_ago)).isoformat(timespec="microseconds")


def fixed_clock() -> datetime:
    return NOW


def _insert(db: Any, table: str, row: dict[str, Any]) -> int:
    cols = ", ".join(row)
    marks = ", ".join("?" * len(row))
    cur = db.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", list(row.values()))
    return int(cur.lastrowid)


def source(db: Any, name: str, kind: str, uri: str, **kw: Any) -> int:
    return _insert(
        db,
        "sources",
        {
            "name": name,
            "kind": kind,
            "uri": uri,
            "params": "{}",
            "created_at": ts(10_000),
            "updated_at": ts(10_000),
            **kw,
        },
    )


def machine(
    db: Any,
    source_id: int,
    name: str,
    *,
    protected: bool = True,
    rpo: int = 900,
    disks: tuple[int, ...] = (40 * GiB,),
    os_: str = "debian 12",
    cpus: int = 2,
    mem: int = 4096,
    power: str = "running",
) -> int:
    mid = _insert(
        db,
        "machines",
        {
            "source_id": source_id,
            "ref": f"ref-{name}",
            "name": name,
            "power_state": power,
            "guest_os": os_,
            "cpus": cpus,
            "memory_mib": mem,
            "protected": int(protected),
            "rpo_seconds": rpo if protected else None,
            "discovered_at": ts(9_000),
        },
    )
    for i, size in enumerate(disks):
        _insert(
            db,
            "disks",
            {"machine_id": mid, "key": f"sd{chr(97 + i)}", "size": size, "label": f"disk {i}"},
        )
    return mid


def restore_points(
    db: Any,
    mid: int,
    ages_min: list[float],
    size: int,
    *,
    inspection: dict[str, Any] | None = None,
    rate: float = 90e6,
    bootable: int | None = None,  # this point (0 = oldest) was boot-verified
) -> None:
    parent = None
    for n, age in enumerate(sorted(ages_min, reverse=True)):
        full = n == 0
        written = size // 2 if full else size // 200 * (1 + n % 3)
        secs = written / (rate * (0.6 + 0.2 * (n % 4)))
        sid = _insert(
            db,
            "sync_sessions",
            {
                "machine_id": mid,
                "snapshot_id": f"snap-{mid}-{n}",
                "parent_rp_id": parent,
                "full": int(full),
                "state": "sealed",
                "bytes_read": written,
                "bytes_written": written,
                "started_at": ts(age + secs / 60),
                "ended_at": ts(age),
            },
        )
        jid = _insert(
            db,
            "jobs",
            {
                "kind": "sync",
                "machine_id": mid,
                "state": "succeeded",
                "params": json.dumps({"full": full}),
                "progress": "{}",
                "result": json.dumps({"restore_point": n + 1}),
                "requested_by": "scheduler",
                "origin": "daemon",
                "created_at": ts(age + 1),
                "started_at": ts(age + 1),
                "ended_at": ts(age),
            },
        )
        del jid
        last = n == len(ages_min) - 1
        parent = _insert(
            db,
            "restore_points",
            {
                "machine_id": mid,
                "session_id": sid,
                "parent_id": parent,
                "snapshot_id": f"snap-{mid}-{n}",
                "source_time": ts(age + secs / 60),
                "sealed_at": ts(age),
                "consistency": "filesystem" if n % 2 else "crash",
                "full": int(full),
                "state": "sealed",
                "verified": "ok" if n % 3 == 0 else None,
                "inspection": json.dumps(inspection) if (inspection and last) else None,
                "bytes_written": written,
                **(
                    {"boot_verified": "bootable", "boot_verified_at": ts(age - 2)}
                    if n == bootable
                    else {}
                ),
            },
        )
        _insert(
            db,
            "restore_point_disks",
            {
                "restore_point_id": parent,
                "disk_key": "sda",
                "path": f"/vol/{mid}/rp{n}.qcow2",
                "size": size,
            },
        )


def failed_syncs(db: Any, mid: int, n: int) -> None:
    for i in range(n):
        _insert(
            db,
            "jobs",
            {
                "kind": "sync",
                "machine_id": mid,
                "state": "failed",
                "params": "{}",
                "progress": "{}",
                "error": "cannot open NBD export: connection refused",
                "created_at": ts(30 - i * 5),
                "ended_at": ts(29 - i * 5),
            },
        )


def seed(db_path: Path, *, running_sync: bool = True) -> dict[str, int]:
    """The standard scene: 4 protected machines in every state the dashboard shows."""
    db = open_store(db_path)
    ids: dict[str, int] = {}
    with db.conn:
        lab = source(db, "lab-nbd", "nbd", "nbd://127.0.0.1:10809/")
        vc = source(
            db, "vc01", "vsphere", "https://vc01.lab.example:443/sdk", tls_thumbprint="ab" * 32
        )
        ids["web01"] = machine(db, vc, "web01", disks=(40 * GiB, 100 * GiB), cpus=4, mem=8192)
        ids["db01"] = machine(
            db, vc, "db01", rpo=600, disks=(200 * GiB,), os_="rhel 9.4", cpus=8, mem=32768
        )
        ids["app01"] = machine(db, lab, "app01", rpo=300, os_="ubuntu 22.04")
        ids["files01"] = machine(
            db, lab, "files01", rpo=3600, os_="windows 2019", disks=(500 * GiB,)
        )
        ids["legacy"] = machine(
            db, lab, "legacy", protected=False, os_="centos 7", power="poweredOff"
        )
        inspection = {  # the shape the inspect job stores (appliance.conversion_jobs)
            "inspection": {
                "os_type": "linux",
                "distro": "debian",
                "product_name": "Debian GNU/Linux 12 (bookworm)",
                "arch": "x86_64",
                "firmware": "bios",
                "bootloader": "grub2",
                "kernels": [{"version": "6.1.0-18-amd64", "default": True}],
                "hypervisor_tools": ["open-vm-tools (vmware)"],
            },
            "preflight": {
                "backend": "builtin",
                "ok": True,
                "blockers": [],
                "warnings": [
                    {
                        "code": "hypervisor-tools",
                        "message": "open-vm-tools installed",
                        "fix": "removed at conversion",
                    }
                ],
            },
        }
        restore_points(
            db,
            ids["web01"],
            [4, 19, 34, 49, 64, 79],
            40 * GiB,
            inspection=inspection,
            bootable=3,  # the plan's latest-verified: the newest boot-verified point
        )
        restore_points(db, ids["db01"], [8.5, 18.5, 28.5], 200 * GiB, rate=120e6)
        restore_points(db, ids["app01"], [47, 95], 40 * GiB, rate=30e6)
        failed_syncs(db, ids["app01"], 3)
        if running_sync:
            _insert(
                db,
                "jobs",
                {
                    "kind": "sync",
                    "machine_id": ids["db01"],
                    "state": "running",
                    "params": "{}",
                    "requested_by": "scheduler",
                    "origin": "daemon",
                    "progress": json.dumps(
                        {
                            "phase": "copying sda",
                            "done": 45 * GiB // 10,
                            "total": 10 * GiB,
                            "rate": 112 * 1024**2,
                            "eta_s": 50,
                        }
                    ),
                    "created_at": ts(1),
                    "started_at": ts(1),
                },
            )
            _insert(
                db,
                "jobs",
                {
                    "kind": "sync",
                    "machine_id": ids["files01"],
                    "state": "queued",
                    "params": "{}",
                    "progress": "{}",
                    "requested_by": "alice",
                    "origin": "ssh:10.0.0.9",
                    "created_at": ts(0.5),
                },
            )
        for i, (lv, kind, mid, msg) in enumerate(
            [
                ("info", "sync", ids["web01"], "web01: restore point 6 sealed (crash-consistent)"),
                (
                    "error",
                    "sync",
                    ids["app01"],
                    "app01: sync failed: cannot open NBD export: connection refused",
                ),
                (
                    "warning",
                    "rpo",
                    ids["app01"],
                    "app01: newest restore point is older than its RPO target (5m)",
                ),
                ("info", "job", ids["db01"], "db01: incremental sync started (dirty bitmap)"),
                ("info", "source", None, "discovery on vc01: 3 machines (0 new, 0 missing)"),
            ]
        ):
            _insert(
                db,
                "events",
                {
                    "ts": ts(20 - i * 4),
                    "level": lv,
                    "kind": kind,
                    "machine_id": mid,
                    "message": msg,
                    "details": "{}",
                },
            )
        for i, (who, origin, action, params, result) in enumerate(
            [
                ("alice", "ssh:10.0.0.9", "source.add", {"name": "vc01", "kind": "vsphere"}, "ok"),
                (
                    "alice",
                    "ssh:10.0.0.9",
                    "machine.protect",
                    {"machine": "web01", "rpo_seconds": 900},
                    "ok",
                ),
                (
                    "bob",
                    "console",
                    "source.remove",
                    {"name": "vc01"},
                    "refused: source 'vc01' still has protected machines",
                ),
                ("bob", "console", "job.sync", {"machine": "db01"}, "job 12"),
            ]
        ):
            # the hash chain is the daemon's business; these rows only feed the display
            _insert(
                db,
                "audit",
                {
                    "ts": ts(300 - i * 60),
                    "who": who,
                    "origin": origin,
                    "action": action,
                    "params": json.dumps(params),
                    "result": result,
                    "prev_hash": "0" * 64,
                    "hash": f"{i:064x}",
                },
            )
        plan_v1 = {
            "name": "dr-main",
            "networks": [
                {"name": "test", "mode": "isolated", "subnet": "192.168.250.0/24", "dhcp": True}
            ],
            "machines": [
                {
                    "machine": "db01",
                    "rank": 1,
                    "restore_point": "latest",
                    "cpus": 8,
                    "memory_mib": 32768,
                    "nics": [{"network": "test", "mac": "keep", "address": "192.168.250.10/24"}],
                    "checks": [
                        {"type": "tcp", "address": "192.168.250.10", "port": 5432, "timeout_s": 600}
                    ],
                },
                {
                    "machine": "web01",
                    "rank": 2,
                    "restore_point": "latest-verified",
                    "cpus": 4,
                    "memory_mib": 8192,
                    "depends_on": ["db01"],
                    "nics": [{"network": "test", "mac": "keep"}],
                    "checks": [{"type": "console", "pattern": "login:", "timeout_s": 300}],
                },
            ],
        }
        plan_v2 = json.loads(json.dumps(plan_v1))
        plan_v2["machines"][1]["memory_mib"] = 4096
        plan_v2["machines"].append(
            {
                "machine": "app01",
                "rank": 2,
                "depends_on": ["db01"],
                "nics": [{"network": "test"}],
                "checks": [{"type": "agent", "timeout_s": 300}],
            }
        )
        p1 = _insert(
            db,
            "plans",
            {
                "name": "dr-main",
                "version": 1,
                "document": json.dumps(plan_v1),
                "created_at": ts(2000),
                "created_by": "alice",
            },
        )
        p2 = _insert(
            db,
            "plans",
            {
                "name": "dr-main",
                "version": 2,
                "document": json.dumps(plan_v2),
                "created_at": ts(600),
                "created_by": "alice",
            },
        )
        del p1

        def machine_run(
            rank: int, convert: float, wait: float, boot: float, ready: float
        ) -> dict[str, Any]:
            return {
                "rank": rank,
                "state": "ready",
                "error": None,
                "rto_s": convert + wait + boot + ready,
                "phases": {"convert_s": convert, "wait_s": wait, "boot_s": boot, "ready_s": ready},
            }

        machines = {
            "db01": machine_run(1, 480, 0, 240, 180),
            "app01": machine_run(2, 420, 480, 240, 240),
            "web01": machine_run(2, 360, 540, 300, 300),
        }
        for name, m in machines.items():
            m["machine"] = name
        report = {
            "machines": machines,
            "totals": {
                "machines": 3,
                "ready": 3,
                "rto_s": 1500.0,
                "slowest_convert_s": 480.0,
                "slowest_boot_by_rank_s": {"1": 420.0, "2": 600.0},
                "ideal_s": 1080.0,
                "overhead_ratio": 1.389,
            },
        }
        _insert(
            db,
            "plan_runs",
            {
                "plan_id": p2,
                "kind": "test",
                "state": "succeeded",
                "step": "clean-up",
                "started_at": ts(120),
                "ended_at": ts(95),
                "report": json.dumps(report),
            },
        )
        steps = [
            ("preflight", 0.0, 30),
            ("final-delta", 1260.0, 29),
            ("stop-source", 60.0, 7),
            ("last-delta", 120.0, 6),
            ("seal", 30.0, 4),
        ]
        cut = {
            "mode": "guided",
            "next": "bring-up",
            "machines_planned": list(machines),
            "stopped_wall": (NOW - timedelta(minutes=6)).timestamp(),
            "steps": [
                {
                    "step": st,
                    "state": "done",
                    "seconds": secs,
                    "at": ts(ago),
                    "by": "alice",
                    "detail": "",
                }
                for st, secs, ago in steps
            ],
        }
        _insert(
            db,
            "plan_runs",
            {
                "plan_id": p2,
                "kind": "cutover",
                "state": "running",
                "step": "bring-up",
                "started_at": ts(30),
                "report": json.dumps(cut),
            },
        )
    db.conn.close()
    return ids


def many_machines(db_path: Path, n: int) -> None:
    """n protected machines with three restore points each (start-up benchmark)."""
    db = open_store(db_path)
    with db.conn:
        src = source(db, "bulk", "nbd", "nbd://127.0.0.1:10809/")
        for i in range(n):
            mid = machine(db, src, f"vm{i:04d}", rpo=900 + (i % 4) * 300)
            restore_points(db, mid, [5 + i % 20, 20 + i % 20, 35 + i % 20], 40 * GiB)
    db.conn.close()


def normalise_daemon_rows(db_path: Path) -> None:
    """Drop what the daemon wrote at start-up with the real clock (its 'started' event), so
    that snapshots only show seeded, fixed-time rows."""
    db = open_store(db_path)
    with db.conn:
        db.execute("DELETE FROM events WHERE kind='daemon'")
    db.conn.close()
