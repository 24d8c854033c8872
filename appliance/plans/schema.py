"""The JSON Schema of a plan document (draft 2020-12), published as plan.schema.json.

The schema catches shapes and types; model.validate() adds what a schema cannot say
(machines that exist, dependency cycles, overlapping addresses, networks that exist) and
turns every finding into a JSON path plus a fix. ``python -m appliance.plans.schema``
rewrites the published file; a unit test keeps the two equal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

FORMAT = 1  # the document format this code reads and writes
SCHEMA_FILE = Path(__file__).with_name("plan.schema.json")

NAME: dict[str, Any] = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"}
TIMEOUT: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": 86_400}
MAC_RE = "^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$"

CHECK: dict[str, Any] = {
    "type": "object",
    "required": ["type"],
    "additionalProperties": False,
    "properties": {
        "type": {
            "enum": ["console", "agent", "tcp", "delay"],
            "description": "console: regex on the serial console; agent: guest agent ping; "
            "tcp: a TCP connect to address:port; delay: wait a fixed time",
        },
        "pattern": {"type": "string", "minLength": 1, "description": "console: a regex"},
        "address": {"type": "string", "description": "tcp: IPv4/IPv6 address"},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "seconds": {"type": "integer", "minimum": 0, "maximum": 86_400},
        "timeout_s": TIMEOUT,
    },
}

NIC: dict[str, Any] = {
    "type": "object",
    "required": ["network"],
    "additionalProperties": False,
    "properties": {
        "network": NAME,
        "mac": {
            "anyOf": [{"enum": ["keep", "new"]}, {"type": "string", "pattern": MAC_RE}],
            "description": "keep: the source NIC's MAC; new: a generated one; or a MAC",
        },
        "address": {"type": "string", "description": "static address with prefix, 10.0.0.5/24"},
        "gateway": {"type": "string"},
        "dns": {"type": "array", "items": {"type": "string"}},
    },
}

MACHINE: dict[str, Any] = {
    "type": "object",
    "required": ["machine", "rank"],
    "additionalProperties": False,
    "properties": {
        "machine": NAME,
        "rank": {"type": "integer", "minimum": 1, "maximum": 99},
        "restore_point": {
            "anyOf": [
                {"enum": ["latest", "latest-verified"]},
                {"type": "integer", "minimum": 1},
            ]
        },
        "cpus": {"type": "integer", "minimum": 1, "maximum": 256},
        "memory_mib": {"type": "integer", "minimum": 128, "maximum": 4_194_304},
        "firmware": {"enum": ["bios", "uefi"]},
        "disk_bus": {"enum": ["virtio", "sata", "scsi"]},
        "conversion": {
            "enum": ["auto", "builtin", "virt-v2v", "none"],
            "description": "none: the guest already boots on KVM (e.g. a libvirt source)",
        },
        "hostname": {"type": "string"},
        "depends_on": {"type": "array", "items": NAME, "uniqueItems": True},
        "nics": {"type": "array", "items": NIC},
        "checks": {"type": "array", "items": CHECK},
    },
}

NETWORK: dict[str, Any] = {
    "type": "object",
    "required": ["name", "mode"],
    "additionalProperties": False,
    "properties": {
        "name": NAME,
        "mode": {
            "enum": ["isolated", "bridged"],
            "description": "isolated: no route out; bridged: a bridge of the appliance "
            "(test runs always use an isolated copy)",
        },
        "bridge": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,15}$"},
        "subnet": {"type": "string", "description": "CIDR, e.g. 10.10.0.0/24"},
        "gateway": {"type": "string"},
        "dhcp": {"type": "boolean"},
    },
}

HOOK: dict[str, Any] = {
    "type": "object",
    "required": ["when", "rank", "command"],
    "additionalProperties": False,
    "properties": {
        "when": {"enum": ["before", "after"]},
        "rank": {"type": "integer", "minimum": 1, "maximum": 99},
        "command": {"type": "string", "minLength": 1, "description": "run by /bin/sh"},
        "timeout_s": TIMEOUT,
        "runs": {
            "type": "array",
            "items": {"enum": ["test", "cutover"]},
            "uniqueItems": True,
            "description": "which runs execute it (default both)",
        },
    },
}

SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://ferryman.invalid/schemas/plan.schema.json",
    "title": "Ferryman DR plan",
    "type": "object",
    "required": ["name", "machines"],
    "additionalProperties": False,
    "properties": {
        "format": {"const": FORMAT},
        "name": NAME,
        "description": {"type": "string", "maxLength": 500},
        "networks": {"type": "array", "items": NETWORK},
        "machines": {"type": "array", "minItems": 1, "items": MACHINE},
        "hooks": {"type": "array", "items": HOOK},
    },
}


def render() -> str:
    return json.dumps(SCHEMA, indent=2, sort_keys=False) + "\n"


def main() -> int:
    SCHEMA_FILE.write_text(render())
    print(SCHEMA_FILE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
