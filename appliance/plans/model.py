"""The plan document: validation with a JSON path and a fix per finding, then typed access.

Two passes. The JSON Schema (schema.py) catches wrong types, unknown keys and bad values; the
rules here catch what a schema cannot: machines the appliance does not know, dependency
cycles, dependencies on machines that boot later, networks that do not exist, overlapping
addresses and subnets, hooks on ranks without machines. Every finding is reported at once,
so an operator fixes a plan in one round instead of one error per try (reliability row 26).
Nothing is stored unless the document passes both.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

import jsonschema  # type: ignore[import-untyped]
from sqlite_utils import Database

from appliance.plans.errors import PlanInvalid, Problem
from appliance.plans.schema import SCHEMA
from store.db import loads

DEFAULT_TIMEOUT_S = {"console": 300, "agent": 180, "tcp": 180, "delay": 0}
DEFAULT_CONSOLE_PATTERN = r"FERRYMAN-BOOT-OK|login:"
HOOK_TIMEOUT_S = 300

_VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
_TYPE_EXAMPLES = {
    "integer": "a whole number, e.g. 2",
    "string": 'text in quotes, e.g. "db01"',
    "boolean": "true or false",
    "array": "a list in [ ]",
    "object": "an object in { }",
}


def json_path(parts: Any) -> str:
    out = "$"
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _schema_fix(err: jsonschema.ValidationError) -> tuple[str, str]:
    """(message, fix) for one schema error, in the operator's words."""
    v, val = err.validator, err.validator_value
    if v == "type":
        want = val if isinstance(val, str) else val[0]
        return (
            f"{err.instance!r} is not of type {want}",
            f"write {_TYPE_EXAMPLES.get(want, want)}",
        )
    if v == "required":
        missing = err.message.split("'")[1] if "'" in err.message else str(val)
        return f"the key '{missing}' is missing", f'add "{missing}"'
    if v == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        return f"unknown key(s) {', '.join(extra)}", f"remove or respell them; allowed: {allowed}"
    if v == "enum":
        return f"{err.instance!r} is not allowed", f"use one of: {', '.join(map(str, val))}"
    if v == "const":
        return f"{err.instance!r} is not supported", f"use {val!r}"
    if v in ("minimum", "maximum"):
        word = "at least" if v == "minimum" else "at most"
        return f"{err.instance!r} is out of range", f"use a number {word} {val}"
    if v == "pattern":
        return (
            f"{err.instance!r} does not match the required form",
            "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"
            if "A-Za-z0-9._-" in str(val)
            else f"match the pattern {val}",
        )
    if v == "minItems":
        return "the list is empty", f"add at least {val} entry"
    if v == "uniqueItems":
        return "the list has duplicates", "remove the duplicate entries"
    if v in ("minLength", "maxLength"):
        return "the text is too short" if v == "minLength" else "the text is too long", (
            "do not leave it empty" if v == "minLength" else f"shorten it to {val} characters"
        )
    if v == "anyOf":
        if "restore_point" in err.path:
            return (
                f"{err.instance!r} is not a restore point policy",
                "use 'latest', 'latest-verified' or a restore point id (a whole number)",
            )
        if "mac" in err.path:
            return (
                f"{err.instance!r} is not a MAC policy",
                "use 'keep', 'new' or a MAC address like 52:54:00:12:34:56",
            )
    return err.message, "see appliance/plans/plan.schema.json"


# -- what the store knows, for the rules -----------------------------------------------------


@dataclass
class KnownMachine:
    id: int
    name: str
    protected: bool
    cutover_done: bool
    nics: list[dict[str, Any]]
    restore_points: dict[int, bool]  # id -> verified ok
    bootable: int = 0  # boot-verified points ("latest-verified" picks the newest)
    boot_verify: str = "off"  # automatic boot verification (appliance/bootverify.py)


@dataclass
class Inventory:
    machines: dict[str, KnownMachine]

    @classmethod
    def from_db(cls, db: Database) -> Inventory:
        out: dict[str, KnownMachine] = {}
        for mid, name, prot, cut, nics in db.execute(
            "SELECT id, name, protected, cutover_done, nics FROM machines"
        ):
            out[name] = KnownMachine(mid, name, bool(prot), bool(cut), loads(nics) or [], {})
        by_id = {m.id: m for m in out.values()}
        for rid, mid, verified, boot in db.execute(
            "SELECT id, machine_id, verified, boot_verified FROM restore_points "
            "WHERE state='sealed'"
        ):
            if mid in by_id:
                by_id[mid].restore_points[int(rid)] = verified == "ok"
                by_id[mid].bootable += boot == "bootable" and verified != "mismatch"
        for mid, policy in db.execute("SELECT id, boot_verify FROM machines"):
            if mid in by_id:
                by_id[mid].boot_verify = str(policy)
        return cls(out)


# -- typed plan ------------------------------------------------------------------------------


@dataclass
class Check:
    type: str
    timeout_s: int
    pattern: str | None = None
    address: str | None = None
    port: int | None = None
    seconds: int = 0

    @property
    def label(self) -> str:
        if self.type == "console":
            return f"console /{self.pattern}/"
        if self.type == "tcp":
            return f"tcp {self.address}:{self.port}"
        if self.type == "delay":
            return f"delay {self.seconds} s"
        return "guest agent ping"


@dataclass
class Nic:
    network: str
    mac: str  # "keep" | "new" | a MAC
    address: str | None = None
    gateway: str | None = None
    dns: list[str] = field(default_factory=list)


@dataclass
class MachinePlan:
    machine: str
    rank: int
    restore_point: str | int = "latest"
    cpus: int | None = None
    memory_mib: int | None = None
    firmware: str | None = None
    disk_bus: str = "virtio"
    conversion: str = "auto"
    hostname: str | None = None
    depends_on: list[str] = field(default_factory=list)
    nics: list[Nic] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


@dataclass
class Network:
    name: str
    mode: str
    bridge: str | None = None
    subnet: str | None = None
    gateway: str | None = None
    dhcp: bool = False


@dataclass
class Hook:
    when: str
    rank: int
    command: str
    timeout_s: int = HOOK_TIMEOUT_S
    runs: list[str] = field(default_factory=lambda: ["test", "cutover"])


@dataclass
class Plan:
    name: str
    machines: list[MachinePlan]
    networks: list[Network]
    hooks: list[Hook]
    description: str = ""

    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.machines})

    def in_rank(self, rank: int) -> list[MachinePlan]:
        return [m for m in self.machines if m.rank == rank]

    def machine(self, name: str) -> MachinePlan:
        return next(m for m in self.machines if m.machine == name)

    def network(self, name: str) -> Network:
        return next(n for n in self.networks if n.name == name)

    def hooks_for(self, when: str, rank: int, run_kind: str) -> list[Hook]:
        return [h for h in self.hooks if h.when == when and h.rank == rank and run_kind in h.runs]


def generated_mac(plan: str, machine: str, index: int) -> str:
    """A stable locally administered MAC (52:54:00 is QEMU's prefix) for mac: "new"."""
    h = hashlib.sha256(f"{plan}/{machine}/{index}".encode()).digest()
    return f"52:54:00:{h[0]:02x}:{h[1]:02x}:{h[2]:02x}"


# -- validation ------------------------------------------------------------------------------


def validate(doc: Any, inventory: Inventory | None = None) -> list[Problem]:
    """Every problem of ``doc``; an empty list means it may be saved and run."""
    errors = sorted(_VALIDATOR.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    problems = []
    for e in errors:
        # anyOf reports the branch errors as context; the parent message is the useful one.
        msg, fix = _schema_fix(e)
        problems.append(Problem(json_path(e.absolute_path), msg, fix))
    if problems:
        return problems  # the rules below assume the shapes are right
    return _rules(doc, inventory)


def _rules(doc: dict[str, Any], inv: Inventory | None) -> list[Problem]:
    out: list[Problem] = []
    machines: list[dict[str, Any]] = doc["machines"]
    networks: list[dict[str, Any]] = doc.get("networks", [])

    # networks: unique names, subnets parse and do not overlap, bridge only when bridged
    subnets: list[tuple[int, ipaddress.IPv4Network | ipaddress.IPv6Network]] = []
    net_index: dict[str, int] = {}
    for i, n in enumerate(networks):
        p = f"$.networks[{i}]"
        if n["name"] in net_index:
            out.append(
                Problem(
                    f"{p}.name",
                    f"network '{n['name']}' is defined twice "
                    f"(also networks[{net_index[n['name']]}])",
                    "rename one of them",
                )
            )
        net_index.setdefault(n["name"], i)
        if n["mode"] == "bridged" and not n.get("bridge"):
            out.append(
                Problem(
                    f"{p}.bridge",
                    f"bridged network '{n['name']}' names no bridge",
                    'add "bridge": the appliance bridge on the production LAN, e.g. "br0"',
                )
            )
        if n["mode"] == "isolated" and n.get("bridge"):
            out.append(
                Problem(
                    f"{p}.bridge",
                    f"isolated network '{n['name']}' cannot use a bridge",
                    'remove "bridge" or set "mode": "bridged"',
                )
            )
        if "subnet" in n:
            try:
                sn = ipaddress.ip_network(n["subnet"], strict=True)
            except ValueError as e:
                out.append(
                    Problem(
                        f"{p}.subnet", f"{n['subnet']!r} is not a subnet: {e}", "e.g. 10.10.0.0/24"
                    )
                )
                continue
            for j, other in subnets:
                if sn.version == other.version and sn.overlaps(other):
                    out.append(
                        Problem(
                            f"{p}.subnet",
                            f"subnet {sn} overlaps {other} of networks[{j}]",
                            "give each network its own address range",
                        )
                    )
            subnets.append((i, sn))
            if "gateway" in n:
                try:
                    gw = ipaddress.ip_address(n["gateway"])
                    if gw not in sn:
                        out.append(
                            Problem(
                                f"{p}.gateway",
                                f"gateway {gw} is outside the subnet {sn}",
                                f"use an address inside {sn}",
                            )
                        )
                except ValueError:
                    out.append(
                        Problem(
                            f"{p}.gateway",
                            f"{n['gateway']!r} is not an IP address",
                            "e.g. 10.10.0.1",
                        )
                    )
        elif n.get("dhcp"):
            out.append(
                Problem(
                    f"{p}.dhcp", f"network '{n['name']}' has DHCP but no subnet", 'add "subnet"'
                )
            )

    # machines: unique, known to the appliance, restore points that exist
    index: dict[str, int] = {}
    for i, m in enumerate(machines):
        p = f"$.machines[{i}]"
        name = m["machine"]
        if name in index:
            out.append(
                Problem(
                    f"{p}.machine",
                    f"machine '{name}' is in the plan twice (also machines[{index[name]}])",
                    "keep one entry per machine",
                )
            )
            continue
        index[name] = i
        if inv is not None:
            km = inv.machines.get(name)
            if km is None:
                close = [k for k in inv.machines if k.lower().startswith(name[:2].lower())]
                out.append(
                    Problem(
                        f"{p}.machine",
                        f"no machine '{name}' on this appliance",
                        "use a name from: ferryman machines"
                        + (f" (did you mean {', '.join(sorted(close)[:3])}?)" if close else ""),
                    )
                )
                continue
            rp = m.get("restore_point", "latest")
            if rp == "latest-verified" and not km.bootable and km.boot_verify == "off":
                out.append(
                    Problem(
                        f"{p}.restore_point",
                        f"machine '{name}' has no boot-verified restore point and none is "
                        "verified automatically",
                        f"ferryman verify-boot {name} --auto every-sync (or run it once: "
                        f"ferryman verify-boot {name} --wait), or use 'latest'",
                    )
                )
            if isinstance(rp, int) and rp not in km.restore_points:
                out.append(
                    Problem(
                        f"{p}.restore_point",
                        f"machine '{name}' has no restore point {rp}",
                        f"use 'latest' or an id from: ferryman points {name}",
                    )
                )
        # checks: what each type needs
        for j, c in enumerate(m.get("checks", [])):
            cp = f"{p}.checks[{j}]"
            t = c["type"]
            if t == "console" and "pattern" in c:
                try:
                    re.compile(c["pattern"])
                except re.error as e:
                    out.append(
                        Problem(
                            f"{cp}.pattern", f"not a valid regex: {e}", "escape special characters"
                        )
                    )
            if t == "tcp":
                for key in ("address", "port"):
                    if key not in c:
                        out.append(
                            Problem(f"{cp}.{key}", f"a tcp check needs '{key}'", f'add "{key}"')
                        )
                if "address" in c:
                    try:
                        ipaddress.ip_address(c["address"])
                    except ValueError:
                        out.append(
                            Problem(
                                f"{cp}.address",
                                f"{c['address']!r} is not an IP address",
                                "use the machine's address on its plan network",
                            )
                        )
            if t == "delay" and "seconds" not in c:
                out.append(
                    Problem(f"{cp}.seconds", "a delay check needs 'seconds'", 'add "seconds"')
                )
            extra = {"console": {"pattern"}, "tcp": {"address", "port"}, "delay": {"seconds"}}
            for key in {"pattern", "address", "port", "seconds"} - extra.get(t, set()):
                if key in c:
                    out.append(
                        Problem(
                            f"{cp}.{key}", f"'{key}' does not apply to a {t} check", "remove it"
                        )
                    )

    # NICs: networks exist; addresses parse, sit in their subnet and are unique
    seen_addr: dict[Any, str] = {}
    seen_mac: dict[str, str] = {}
    for i, m in enumerate(machines):
        for j, nic in enumerate(m.get("nics", [])):
            p = f"$.machines[{i}].nics[{j}]"
            if nic["network"] not in net_index:
                defined = ", ".join(net_index) or "none defined"
                out.append(
                    Problem(
                        f"{p}.network",
                        f"network '{nic['network']}' does not exist",
                        f"use a network of $.networks ({defined}) or add it there",
                    )
                )
                net = None
            else:
                net = networks[net_index[nic["network"]]]
            mac = nic.get("mac", "keep")
            if mac not in ("keep", "new"):
                low = mac.lower()
                if low in seen_mac:
                    out.append(
                        Problem(
                            f"{p}.mac", f"MAC {mac} is also used at {seen_mac[low]}", 'use "new"'
                        )
                    )
                seen_mac.setdefault(low, p)
            if "address" not in nic:
                if "gateway" in nic:
                    out.append(
                        Problem(
                            f"{p}.gateway",
                            "a gateway without an address",
                            'add "address" or remove it',
                        )
                    )
                continue
            try:
                iface = ipaddress.ip_interface(nic["address"])
            except ValueError:
                out.append(
                    Problem(
                        f"{p}.address",
                        f"{nic['address']!r} is not an address with a prefix",
                        'write it as "10.10.0.5/24"',
                    )
                )
                continue
            if "/" not in nic["address"]:
                out.append(
                    Problem(
                        f"{p}.address",
                        f"{nic['address']!r} has no prefix length",
                        'write "10.10.0.5/24"',
                    )
                )
                continue
            ip = iface.ip
            if ip in seen_addr:
                out.append(
                    Problem(
                        f"{p}.address",
                        f"address {ip} is also assigned at {seen_addr[ip]}",
                        "give every NIC its own address",
                    )
                )
            seen_addr.setdefault(ip, f"{p}.address")
            if net is not None and "subnet" in net:
                with contextlib.suppress(ValueError):
                    sn = ipaddress.ip_network(net["subnet"])
                    if ip not in sn:
                        out.append(
                            Problem(
                                f"{p}.address",
                                f"address {ip} is outside network '{net['name']}' ({sn})",
                                f"use an address inside {sn}",
                            )
                        )
                    elif ip in (sn.network_address, sn.broadcast_address) and sn.prefixlen < 31:
                        out.append(
                            Problem(
                                f"{p}.address",
                                f"{ip} is not a host address of {sn}",
                                "pick a host address",
                            )
                        )
                    elif "gateway" in net and str(ip) == net["gateway"]:
                        out.append(
                            Problem(
                                f"{p}.address",
                                f"{ip} is the gateway of network '{net['name']}'",
                                "pick another address",
                            )
                        )
            if "gateway" in nic:
                try:
                    gw = ipaddress.ip_address(nic["gateway"])
                    if gw not in iface.network:
                        out.append(
                            Problem(
                                f"{p}.gateway",
                                f"gateway {gw} is not on {iface.network}",
                                f"use an address inside {iface.network}",
                            )
                        )
                except ValueError:
                    out.append(
                        Problem(
                            f"{p}.gateway",
                            f"{nic['gateway']!r} is not an IP address",
                            "e.g. 10.10.0.1",
                        )
                    )

    # dependencies: known, not self, no cycles, never on a machine that boots later
    rank_of = {m["machine"]: m["rank"] for m in machines}
    for i, m in enumerate(machines):
        for j, dep in enumerate(m.get("depends_on", [])):
            p = f"$.machines[{i}].depends_on[{j}]"
            if dep == m["machine"]:
                out.append(Problem(p, f"'{dep}' depends on itself", "remove it"))
            elif dep not in rank_of:
                out.append(
                    Problem(
                        p,
                        f"'{dep}' is not a machine of this plan",
                        "add it to $.machines or remove it",
                    )
                )
            elif rank_of[dep] > m["rank"]:
                out.append(
                    Problem(
                        p,
                        f"'{m['machine']}' (rank {m['rank']}) depends on '{dep}', which boots "
                        f"later (rank {rank_of[dep]})",
                        f"move '{dep}' to rank {m['rank']} or lower, or '{m['machine']}' higher",
                    )
                )
    cycle = _find_cycle(machines)
    if cycle:
        i = next(k for k, m in enumerate(machines) if m["machine"] == cycle[0])
        out.append(
            Problem(
                f"$.machines[{i}].depends_on",
                f"dependency cycle: {' -> '.join(cycle)}",
                "remove one of these dependencies; a cycle can never boot",
            )
        )

    # hooks: on ranks that have machines
    ranks = set(rank_of.values())
    for i, h in enumerate(doc.get("hooks", [])):
        if h["rank"] not in ranks:
            out.append(
                Problem(
                    f"$.hooks[{i}].rank",
                    f"no machine is in rank {h['rank']}",
                    f"use one of the plan's ranks: {', '.join(map(str, sorted(ranks)))}",
                )
            )
    return out


def _find_cycle(machines: list[dict[str, Any]]) -> list[str] | None:
    deps = {
        m["machine"]: [d for d in m.get("depends_on", []) if d != m["machine"]] for m in machines
    }
    state: dict[str, int] = {}  # 1 visiting, 2 done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in deps.get(n, []):
            if d not in deps:
                continue
            if state.get(d) == 1:
                return [*stack[stack.index(d) :], d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for name in deps:
        if name not in state:
            found = visit(name)
            if found:
                return found
    return None


def check_document(doc: Any, inventory: Inventory | None = None) -> Plan:
    """Validate and parse; raises PlanInvalid with every problem."""
    problems = validate(doc, inventory)
    if problems:
        name = doc.get("name", "?") if isinstance(doc, dict) else "?"
        raise PlanInvalid(str(name), problems)
    return parse(doc)


def parse(doc: dict[str, Any]) -> Plan:
    """A validated document -> Plan with every default filled in."""
    machines = []
    for m in doc["machines"]:
        checks = []
        for c in m.get("checks", []):
            t = c["type"]
            checks.append(
                Check(
                    type=t,
                    timeout_s=int(c.get("timeout_s", DEFAULT_TIMEOUT_S[t])),
                    pattern=c.get("pattern", DEFAULT_CONSOLE_PATTERN) if t == "console" else None,
                    address=c.get("address"),
                    port=c.get("port"),
                    seconds=int(c.get("seconds", 0)),
                )
            )
        machines.append(
            MachinePlan(
                machine=m["machine"],
                rank=m["rank"],
                restore_point=m.get("restore_point", "latest"),
                cpus=m.get("cpus"),
                memory_mib=m.get("memory_mib"),
                firmware=m.get("firmware"),
                disk_bus=m.get("disk_bus", "virtio"),
                conversion=m.get("conversion", "auto"),
                hostname=m.get("hostname"),
                depends_on=list(m.get("depends_on", [])),
                nics=[
                    Nic(
                        network=n["network"],
                        mac=n.get("mac", "keep"),
                        address=n.get("address"),
                        gateway=n.get("gateway"),
                        dns=list(n.get("dns", [])),
                    )
                    for n in m.get("nics", [])
                ],
                checks=checks,
            )
        )
    return Plan(
        name=doc["name"],
        description=doc.get("description", ""),
        machines=machines,
        networks=[
            Network(
                name=n["name"],
                mode=n["mode"],
                bridge=n.get("bridge"),
                subnet=n.get("subnet"),
                gateway=n.get("gateway"),
                dhcp=bool(n.get("dhcp", False)),
            )
            for n in doc.get("networks", [])
        ],
        hooks=[
            Hook(
                when=h["when"],
                rank=h["rank"],
                command=h["command"],
                timeout_s=int(h.get("timeout_s", HOOK_TIMEOUT_S)),
                runs=list(h.get("runs", ["test", "cutover"])),
            )
            for h in doc.get("hooks", [])
        ],
    )
