"""``ferryman plan new``: a starting plan from the machines the appliance protects.

Everything a field engineer would otherwise type: each machine with its CPUs, memory and
firmware from the source, one NIC per source NIC on an isolated network "lan" (edit it to a
bridged production network before a cutover), the latest restore point, and a console check
for the boot marker or a login prompt. All in rank 1: the engineer sets the boot order.
"""

from __future__ import annotations

from typing import Any

from sqlite_utils import Database

from appliance.errors import NotFound
from appliance.plans.model import DEFAULT_CONSOLE_PATTERN, DEFAULT_TIMEOUT_S
from appliance.plans.schema import FORMAT
from store.db import loads


def new_plan(db: Database, name: str, machines: list[str] | None = None) -> dict[str, Any]:
    rows = db.execute(
        "SELECT name, cpus, memory_mib, firmware, nics, protected, cutover_done FROM machines "
        "ORDER BY name"
    ).fetchall()
    by_name = {r[0]: r for r in rows}
    if machines:
        missing = [m for m in machines if m not in by_name]
        if missing:
            raise NotFound(
                f"no machine {', '.join(repr(m) for m in missing)} on this appliance",
                hint="list machines with: ferryman machines",
            )
        chosen = [by_name[m] for m in machines]
    else:
        chosen = [r for r in rows if r[5] and not r[6]]
        if not chosen:
            raise NotFound(
                "no protected machine to put in a plan",
                hint="protect machines first (ferryman protect NAME) or name them",
            )
    out_machines = []
    for mname, cpus, mem, firmware, nics, _prot, _cut in chosen:
        entry: dict[str, Any] = {
            "machine": mname,
            "rank": 1,
            "restore_point": "latest",
            "cpus": max(1, int(cpus or 1)),
            "memory_mib": max(512, int(mem or 1024)),
            "firmware": "uefi" if firmware == "efi" else "bios",
            "disk_bus": "virtio",
            "conversion": "auto",
            "nics": [{"network": "lan", "mac": "keep"} for _ in (loads(nics) or [{}])],
            "checks": [
                {
                    "type": "console",
                    "pattern": DEFAULT_CONSOLE_PATTERN,
                    "timeout_s": DEFAULT_TIMEOUT_S["console"],
                }
            ],
        }
        out_machines.append(entry)
    return {
        "format": FORMAT,
        "name": name,
        "description": f"generated from {len(out_machines)} machine(s); set ranks, "
        "networks and checks before the first test run",
        "networks": [{"name": "lan", "mode": "isolated"}],
        "machines": out_machines,
        "hooks": [],
    }
