"""Plan documents in the editor: the JSON Schema, live validation, and where each problem is.

Issue 6 owns the plan format and publishes its schema (appliance.plans.schema); the editor
uses it when present and otherwise this draft of the same shape (machines, networks, ranks,
depends_on, checks, hooks), so a plan written here stays valid there. Every problem carries
the JSON path, the line and column, and the fix, so the JSON view can say
"line 12, machines[0].cpus: ... -> write a whole number, e.g. 2".
"""

from __future__ import annotations

import difflib
import ipaddress
import json
from dataclasses import dataclass
from typing import Any

import jsonschema

NAME = {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"}
CHECK = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {"enum": ["console", "agent", "tcp", "delay"]},
        "pattern": {"type": "string", "minLength": 1},
        "address": {"type": "string"},
        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
        "seconds": {"type": "integer", "minimum": 1},
        "timeout_s": {"type": "integer", "minimum": 1, "maximum": 86_400},
    },
    "additionalProperties": False,
}
DRAFT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Ferryman DR plan (draft until issue 6 publishes its schema)",
    "type": "object",
    "required": ["name", "machines"],
    "additionalProperties": False,
    "properties": {
        "name": NAME,
        "description": {"type": "string", "maxLength": 500},
        "networks": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "mode"],
                "additionalProperties": False,
                "properties": {
                    "name": NAME,
                    "mode": {"enum": ["isolated", "bridged"]},
                    "bridge": {"type": "string"},
                    "subnet": {"type": "string"},
                    "dhcp": {"type": "boolean"},
                },
            },
        },
        "machines": {
            "type": "array",
            "minItems": 1,
            "items": {
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
                    "memory_mib": {"type": "integer", "minimum": 128},
                    "firmware": {"enum": ["bios", "uefi"]},
                    "disk_bus": {"enum": ["virtio", "sata", "scsi"]},
                    "depends_on": {"type": "array", "items": NAME, "uniqueItems": True},
                    "nics": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["network"],
                            "additionalProperties": False,
                            "properties": {
                                "network": NAME,
                                "mac": {"enum": ["keep", "new"]},
                                "address": {"type": "string"},
                                "gateway": {"type": "string"},
                            },
                        },
                    },
                    "checks": {"type": "array", "items": CHECK},
                },
            },
        },
        "hooks": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["when", "rank", "command"],
                "additionalProperties": False,
                "properties": {
                    "when": {"enum": ["before", "after"]},
                    "rank": {"type": "integer", "minimum": 1},
                    "command": {"type": "string", "minLength": 1},
                },
            },
        },
    },
}

try:  # issue 6's published schema, once it is there; the draft above until then
    from appliance.plans.schema import SCHEMA as _PUBLISHED

    SCHEMA: dict[str, Any] = _PUBLISHED
except ImportError:
    SCHEMA = DRAFT_SCHEMA

_FIX_BY_VALIDATOR = {
    "type": "write a value of type {expected}",
    "required": "add the key {missing}",
    "enum": "use one of: {choices}",
    "minimum": "use a number of at least {limit}",
    "maximum": "use a number of at most {limit}",
    "pattern": "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
    "additionalProperties": "remove the key, or check its spelling",
    "minItems": "add at least one entry",
    "uniqueItems": "remove the duplicate",
    "minLength": "do not leave it empty",
    "maxLength": "shorten it",
    "anyOf": "use 'latest', 'latest-verified' or a restore point id (a whole number)",
}
_TYPE_EXAMPLES = {
    "integer": "a whole number, e.g. 2",
    "string": 'text in quotes, e.g. "db01"',
    "boolean": "true or false",
    "array": "a list in [ ]",
    "object": "an object in { }",
}


@dataclass(frozen=True)
class Problem:
    path: str  # machines[0].cpus
    line: int  # 1-based
    column: int
    message: str
    fix: str

    def __str__(self) -> str:
        where = self.path or "(document)"
        return f"line {self.line}:{self.column} {where}: {self.message} -> {self.fix}"


def path_str(path: list[Any] | tuple[Any, ...]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


# -- positions: a small scanner that records where every value starts ----------------------


def locate(text: str) -> dict[tuple[Any, ...], int]:
    """Offset of each value by JSON path, for a text that json.loads accepts."""
    pos: dict[tuple[Any, ...], int] = {}
    dec = json.JSONDecoder()
    ws = " \t\r\n"

    def skip(i: int) -> int:
        while i < len(text) and text[i] in ws:
            i += 1
        return i

    def value(i: int, path: tuple[Any, ...]) -> int:
        i = skip(i)
        pos[path] = i
        c = text[i]
        if c == "{":
            i = skip(i + 1)
            if text[i] == "}":
                return i + 1
            while True:
                key, i = dec.raw_decode(text, skip(i))
                i = skip(i)  # at ':'
                i = value(i + 1, (*path, key))
                i = skip(i)
                if text[i] == ",":
                    i += 1
                    continue
                return i + 1  # '}'
        if c == "[":
            i = skip(i + 1)
            if text[i] == "]":
                return i + 1
            n = 0
            while True:
                i = value(i, (*path, n))
                n += 1
                i = skip(i)
                if text[i] == ",":
                    i += 1
                    continue
                return i + 1
        _, end = dec.raw_decode(text, i)
        return int(end)

    value(0, ())
    return pos


def line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    col = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return line, col


def _fix(err: jsonschema.ValidationError) -> str:
    v = str(err.validator)
    if v == "type":
        expected = err.validator_value
        return "write " + _TYPE_EXAMPLES.get(str(expected), f"a {expected}")
    if v == "required":
        missing = str(err.message).split("'")[1] if "'" in err.message else "?"
        return f'add the key "{missing}"'
    if v == "enum":
        return "use one of: " + ", ".join(json.dumps(c) for c in err.validator_value)
    if v in ("minimum", "maximum"):
        return _FIX_BY_VALIDATOR[v].format(limit=err.validator_value)
    return _FIX_BY_VALIDATOR.get(v, "see docs/tui.md, Plan editor")


# -- validation --------------------------------------------------------------------------------


def validate_text(text: str, known_machines: set[str] | None = None) -> list[Problem]:
    """Parse and validate; problems sorted by line. Empty list: the plan can be saved."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        return [
            Problem(
                "",
                e.lineno,
                e.colno,
                f"not valid JSON: {e.msg}",
                "check the quotes, commas and brackets just before this point",
            )
        ]
    positions = locate(text)

    def at(path: tuple[Any, ...]) -> tuple[int, int]:
        p = tuple(path)
        while p and p not in positions:
            p = p[:-1]
        return line_col(text, positions.get(p, 0))

    problems: list[Problem] = []
    validator = jsonschema.Draft202012Validator(SCHEMA)
    for err in validator.iter_errors(doc):
        path = tuple(err.absolute_path)
        ln, col = at(path)
        msg = err.message if len(err.message) < 120 else err.message[:117] + "..."
        problems.append(Problem(path_str(path), ln, col, msg, _fix(err)))
    if not problems and isinstance(doc, dict):
        for path, msg, fix in semantic_problems(doc, known_machines):
            ln, col = at(path)
            problems.append(Problem(path_str(path), ln, col, msg, fix))
    return sorted(problems, key=lambda p: (p.line, p.column))


def semantic_problems(
    doc: dict[str, Any], known: set[str] | None
) -> list[tuple[tuple[Any, ...], str, str]]:
    """What a schema cannot say: unknown machines and networks, cycles, clashing addresses."""
    out: list[tuple[tuple[Any, ...], str, str]] = []
    nets = {n["name"] for n in doc.get("networks", [])}
    machines = doc["machines"]
    names = [m["machine"] for m in machines]
    seen: set[str] = set()
    for i, m in enumerate(machines):
        name = m["machine"]
        if name in seen:
            out.append(
                (
                    (("machines", i, "machine")),
                    f"'{name}' is in the plan twice",
                    "remove one of the two entries",
                )
            )
        seen.add(name)
        if known is not None and name not in known:
            out.append(
                (
                    ("machines", i, "machine"),
                    f"no protected machine '{name}'",
                    "protect it first, or correct the name (see Dashboard)",
                )
            )
        for j, dep in enumerate(m.get("depends_on", [])):
            if dep not in names:
                out.append(
                    (
                        ("machines", i, "depends_on", j),
                        f"'{dep}' is not a machine of this plan",
                        "add it to machines or remove the dependency",
                    )
                )
        for j, nic in enumerate(m.get("nics", [])):
            if nic["network"] not in nets:
                out.append(
                    (
                        ("machines", i, "nics", j, "network"),
                        f"network '{nic['network']}' does not exist",
                        "add it under networks, or use one of: "
                        + (", ".join(sorted(nets)) or "(none defined)"),
                    )
                )
    # dependency cycles and rank order
    rank = {m["machine"]: m["rank"] for m in machines}
    deps = {m["machine"]: list(m.get("depends_on", [])) for m in machines}
    for i, m in enumerate(machines):
        for j, dep in enumerate(m.get("depends_on", [])):
            if dep in rank and rank[dep] > m["rank"]:
                out.append(
                    (
                        ("machines", i, "depends_on", j),
                        f"'{m['machine']}' (rank {m['rank']}) waits for '{dep}' which boots "
                        f"later (rank {rank[dep]})",
                        f"give '{dep}' a rank of at most {m['rank']}",
                    )
                )
    state: dict[str, int] = {}

    def cyc(n: str, stack: list[str]) -> list[str] | None:
        state[n] = 1
        for d in deps.get(n, []):
            if d not in deps:
                continue
            if state.get(d) == 1:
                return [*stack, n, d]
            if state.get(d) is None and (found := cyc(d, [*stack, n])):
                return found
        state[n] = 2
        return None

    for n in deps:
        if state.get(n) is None and (found := cyc(n, [])):
            i = names.index(found[-2])
            out.append(
                (
                    ("machines", i, "depends_on"),
                    "dependency cycle: " + " -> ".join(found[found.index(found[-1]) :]),
                    "remove one of these dependencies",
                )
            )
            break
    # overlapping addresses
    used: dict[Any, tuple[Any, ...]] = {}
    for i, m in enumerate(machines):
        for j, nic in enumerate(m.get("nics", [])):
            if "address" not in nic:
                continue
            path = ("machines", i, "nics", j, "address")
            try:
                ip = ipaddress.ip_interface(nic["address"]).ip
            except ValueError:
                out.append(
                    (path, f"'{nic['address']}' is not an IP address", "write it as 10.0.0.5/24")
                )
                continue
            if ip in used:
                out.append(
                    (
                        path,
                        f"address {ip} is already used at {path_str(used[ip])}",
                        "give each NIC its own address",
                    )
                )
            used[ip] = path
    return out


def diff(old: str, new: str, old_label: str, new_label: str) -> list[str]:
    return list(
        difflib.unified_diff(old.splitlines(), new.splitlines(), old_label, new_label, lineterm="")
    )


def skeleton(name: str, machines: list[dict[str, Any]]) -> dict[str, Any]:
    """A first plan from the protected machines: one rank, an isolated test network."""
    return {
        "name": name,
        "networks": [
            {"name": "test", "mode": "isolated", "subnet": "192.168.250.0/24", "dhcp": True}
        ],
        "machines": [
            {
                "machine": m["name"],
                "rank": 1,
                "restore_point": "latest",
                "cpus": max(1, int(m.get("cpus") or 1)),
                "memory_mib": max(128, int(m.get("memory_mib") or 1024)),
                "nics": [{"network": "test", "mac": "keep"}],
                "checks": [{"type": "agent", "timeout_s": 600}],
            }
            for m in machines
        ],
    }


def dumps(doc: Any) -> str:
    return json.dumps(doc, indent=2) + "\n"
