"""Verbs for sources, machines, protection, syncs and restore points."""

from __future__ import annotations

import argparse
import getpass
import re
import sys
from pathlib import Path
from typing import Any

from appliance.cli import Output, table, verb_adder
from appliance.client import Client
from appliance.errors import FerrymanError
from appliance.units import human_bytes


def parse_duration(text: str) -> int:
    """'90s', '15m', '2h', '1d' or plain seconds -> seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration; use e.g. 90s, 15m, 2h")
    return int(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_rate(text: str) -> int:
    """'50MiB' / '50M' (bytes/s, binary), '100mbit' (bits/s) -> bytes per second."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b|bit)?(/s)?\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a rate; use e.g. 50MiB or 100mbit")
    value = float(m.group(1))
    unit = m.group(3) or "b"
    if unit == "bit":
        return int(value * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)] / 8)
    return int(value * 1024 ** "_kmgt".index(m.group(2) or "_"))


def _age(s: float | None) -> str:
    if s is None:
        return "never"
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{s / n:.0f}{unit} ago"
    return f"{s:.0f}s ago"


def _password(args: argparse.Namespace) -> str | None:
    key_file = getattr(args, "key_file", None)
    if key_file and args.kind != "linux-agent":
        raise FerrymanError(
            f"--key-file is for linux-agent sources, not {args.kind}",
            hint="give the password with --password-file or --password-stdin",
        )
    path = key_file or args.password_file
    if path:
        with open(path) as f:
            if args.kind == "linux-agent":  # an SSH private key: the whole file
                return f.read()
            return f.readline().rstrip("\n")
    if args.password_stdin:
        if args.kind == "linux-agent":
            return sys.stdin.read()
        return sys.stdin.readline().rstrip("\n")
    if args.kind == "vsphere" and sys.stdin.isatty():
        return getpass.getpass(f"password for {args.user or 'the user'} on {args.uri}: ")
    return None


def _params(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise FerrymanError(f"--param '{p}' is not KEY=VALUE", hint="e.g. --param domain=web01")
        k, v = p.split("=", 1)
        out[k] = v
    return out


def sources(args: argparse.Namespace) -> Output:
    with Client() as c:
        rows = c.sources()
    text = table(
        [
            (
                s["name"],
                s["kind"],
                s["uri"],
                s["machines"],
                s["protected"],
                "INSECURE"
                if s["insecure"]
                else ("pinned" if s["tls_thumbprint"] or s["params"].get("host_key") else ""),
            )
            for s in rows
        ],
        ["NAME", "KIND", "ADDRESS", "MACHINES", "PROTECTED", "KEY"],
    )
    return Output(rows, text if rows else "no sources; add one: ferryman source add --help")


def source_add(args: argparse.Namespace) -> Output:
    with Client() as c:
        s = c.add_source(
            args.name,
            args.kind,
            args.uri,
            username=args.user,
            password=_password(args),
            params=_params(args.param),
            thumbprint=args.thumbprint,
            insecure=args.insecure,
            test=not args.no_test,
        )
    pinned = ""
    if s["params"].get("host_key"):
        from appliance.sources.agent.ssh import HostKey

        pinned = f"; SSH host key {HostKey.parse(s['params']['host_key']).fingerprint} pinned"
    return Output(
        s,
        f"source {s['name']} added ({s['kind']} {s['uri']}{pinned}); "
        f"next: ferryman discover {s['name']}",
    )


def source_edit(args: argparse.Namespace) -> Output:
    params: dict[str, Any] = _params(args.param)
    params.update({k: None for k in args.unset_param})
    with Client() as c:
        password = None
        if args.password_file or args.password_stdin:  # an agent's key file is read whole
            kind = next((s["kind"] for s in c.sources() if s["name"] == args.name), "")
            password = _password(argparse.Namespace(**{**vars(args), "kind": kind}))
        s = c.update_source(
            args.name,
            new_name=args.rename,
            uri=args.uri,
            username=args.user,
            password=password,
            params=params or None,
            throttle_bps=args.throttle,
            clear_throttle=args.no_throttle,
            thumbprint=args.thumbprint,
            insecure=args.insecure,
            test=not args.no_test,
        )
    what = ", ".join(s["changed"]) or "nothing (the values given are the current ones)"
    return Output(s, f"source {s['name']} changed: {what}")


def source_tls(args: argparse.Namespace) -> Output:
    with Client() as c:
        cert = c.tls_probe(args.uri)
    text = (
        f"{cert['host']}:{cert['port']} presents\n  SHA-256 {cert['thumbprint']}\n"
        f"  subject {cert['subject']}\n  issuer  {cert['issuer']}\n"
        f"  trusted by system CAs: {'yes' if cert['verified_by_ca'] else 'no'}\n"
        "Confirm the fingerprint with the vCenter administrator, then add the source with "
        f"--thumbprint {cert['thumbprint']}"
    )
    return Output(cert, text)


def source_hostkey(args: argparse.Namespace) -> Output:
    with Client() as c:
        k = c.ssh_host_key(args.uri)
    text = (
        f"{k['host']}:{k['port']} presents\n  {k['fingerprint']}\n"
        "Confirm the fingerprint with the server's administrator (ssh-keygen -lf "
        "/etc/ssh/ssh_host_ed25519_key.pub on the server), then add the source with\n"
        f"  --param host_key={k['fingerprint']}"
    )
    return Output(k, text)


def source_test(args: argparse.Namespace) -> Output:
    with Client() as c:
        r = c.test_source(args.name)
    return Output(r, f"source {args.name}: reachable, credentials accepted")


def source_remove(args: argparse.Namespace) -> Output:
    with Client() as c:
        r = c.remove_source(args.name, purge=args.purge)
    gone = f"; deleted {len(r['purged'])} restore-point directories" if r["purged"] else ""
    return Output(r, f"source {r['removed']} removed{gone}")


def _maybe_wait(c: Client, job: dict[str, Any], wait: bool, what: str) -> Output:
    if not wait:
        return Output(
            job,
            f"{what}: job {job['id']} started; follow it with: "
            f"ferryman job show {job['id']} --wait",
        )
    job = c.wait(job["id"])
    ok = job["state"] == "succeeded"
    detail = job.get("result") if ok else job.get("error")
    return Output(job, f"{what}: job {job['id']} {job['state']}: {detail}", 0 if ok else 1)


def discover(args: argparse.Namespace) -> Output:
    with Client() as c:
        return _maybe_wait(c, c.discover(args.source), args.wait, f"discover {args.source}")


def machines(args: argparse.Namespace) -> Output:
    with Client() as c:
        rows = c.machines()
    out = []
    for m in rows:
        rp = m["newest_rp"]
        job = m["active_job"]
        out.append(
            (
                m["name"],
                m["source"],
                m["power_state"],
                human_bytes(m["size"]),
                "yes" if m["protected"] else "no",
                _age(rp["age_s"]) if rp else "never",
                m["rpo_status"],
                f"{job['kind']} {job['state']}" if job else "",
                f"{m['failed_syncs']} failed" if m["failed_syncs"] else "",
            )
        )
    text = table(
        out, ["NAME", "SOURCE", "POWER", "SIZE", "PROTECTED", "NEWEST POINT", "RPO", "JOB", "ALERT"]
    )
    return Output(rows, text if rows else "no machines; discover a source first")


def machine_show(args: argparse.Namespace) -> Output:
    with Client() as c:
        m = c.machine(args.name)
    lines = [
        f"{m['name']} on {m['source']}: {m['power_state']}, {m['guest_os'] or 'unknown OS'},"
        f" {m['cpus']} CPU, {m['memory_mib']} MiB, firmware {m['firmware'] or '?'}",
        f"protected: {'yes' if m['protected'] else 'no'}, RPO target "
        f"{m['rpo_seconds'] or '-'} s ({m['rpo_status']}), throttle "
        f"{human_bytes(m['throttle_bps']) + '/s' if m['throttle_bps'] else 'none'}",
        "",
        table(
            [(d["key"], human_bytes(d["size"]), d["label"]) for d in m["disks"]],
            ["DISK", "SIZE", "WHERE"],
        ),
        "",
    ]
    lines.append(_points_text(m["restore_points"]))
    return Output(m, "\n".join(lines))


def _points_text(rps: list[dict[str, Any]]) -> str:
    if not rps:
        return "no restore points yet"
    return table(
        [
            (
                r["id"],
                r["source_time"][:19],
                r["consistency"],
                "full" if r["full"] else "delta",
                human_bytes(r["bytes_written"]),
                r["verified"] or "-",
                r["boot_verified"] or "-",
            )
            for r in rps
        ],
        ["POINT", "SOURCE TIME (UTC)", "CONSISTENCY", "TYPE", "WRITTEN", "VERIFIED", "BOOT"],
    )


def protect(args: argparse.Namespace) -> Output:
    with Client() as c:
        m = c.protect(
            args.name,
            rpo_seconds=args.rpo,
            throttle_bps=args.throttle,
            verify_every_sync=args.verify_every_sync or None,
        )
    return Output(
        m,
        f"{m['name']} protected (RPO target {m['rpo_seconds'] or 'none'} s); "
        f"first sync: ferryman sync {m['name']}",
    )


def unprotect(args: argparse.Namespace) -> Output:
    with Client() as c:
        m = c.unprotect(args.name)
    return Output(m, f"{m['name']} no longer protected; its restore points are kept")


def set_machine(args: argparse.Namespace) -> Output:
    with Client() as c:
        m = c.set_machine(
            args.name,
            rpo_seconds=args.rpo,
            throttle_bps=args.throttle,
            clear_throttle=args.no_throttle,
        )
    return Output(
        m,
        f"{m['name']}: RPO target {m['rpo_seconds'] or '-'} s, throttle "
        f"{human_bytes(m['throttle_bps']) + '/s' if m['throttle_bps'] else 'none'}",
    )


def sync(args: argparse.Namespace) -> Output:
    with Client() as c:
        return _maybe_wait(c, c.sync(args.name, full=args.full), args.wait, f"sync {args.name}")


def points(args: argparse.Namespace) -> Output:
    with Client() as c:
        rps = c.restore_points(args.name)
    return Output(rps, _points_text(rps))


def point_delete(args: argparse.Namespace) -> Output:
    with Client() as c:
        r = c.delete_restore_point(args.id)
    return Output(r, f"restore point {args.id} deleted")


def verify(args: argparse.Namespace) -> Output:
    with Client() as c:
        return _maybe_wait(c, c.verify(args.id), args.wait, f"verify point {args.id}")


def _verdict_text(data: dict[str, Any]) -> str:
    insp, v = data.get("inspection") or {}, data.get("preflight") or {}
    lines = [
        f"guest: {insp.get('product_name') or insp.get('distro') or '?'} "
        f"({insp.get('os_type', '?')}, {insp.get('arch', '?')})",
        f"verdict: {'READY' if v.get('ok') else 'BLOCKED'} (backend {v.get('backend')})",
    ]
    lines += [f"  blocker: {b}" for b in v.get("blockers", [])]
    lines += [f"  warning: {w}" for w in v.get("warnings", [])]
    return "\n".join(lines)


def inspect(args: argparse.Namespace) -> Output:
    with Client() as c:
        job = c.wait(c.inspect(args.id)["id"])
    if job["state"] != "succeeded":
        return Output(job, f"inspect point {args.id}: {job['state']}: {job['error']}", 1)
    return Output(job["result"], _verdict_text(job["result"]))


def preflight(args: argparse.Namespace) -> Output:
    with Client() as c:
        rp = next((r for r in c.restore_points(args.machine) if r["id"] == args.id), None)
        if rp is None:
            raise FerrymanError(
                f"no restore point {args.id} of {args.machine}",
                hint=f"list them with: ferryman points {args.machine}",
            )
        if not rp["inspection"]:
            job = c.wait(c.inspect(args.id)["id"])
            if job["state"] != "succeeded":
                return Output(job, f"inspect point {args.id}: {job['error']}", 1)
            data = job["result"]
        else:
            data = rp["inspection"]
    ok = bool((data.get("preflight") or {}).get("ok"))
    return Output(data, _verdict_text(data), 0 if ok else 1)


def convert(args: argparse.Namespace) -> Output:
    with Client() as c:
        if args.preview:  # onto a throw-away overlay the daemon deletes at the end
            job = c.convert_preview(args.id, args.backend)
        else:
            job = c.convert(args.id, str(Path(args.to).resolve()), args.backend)
        return _maybe_wait(c, job, args.wait, f"convert point {args.id}")


def audit_show(args: argparse.Namespace) -> Output:
    with Client() as c:
        rows = c.audit(args.limit)
    return Output(
        rows,
        table(
            [(a["ts"][:19], a["who"], a["origin"], a["action"], a["result"]) for a in rows],
            ["TIME (UTC)", "WHO", "FROM", "ACTION", "RESULT"],
        ),
    )


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    verb = verb_adder(sub, common)

    verb("sources", sources, "list registered sources")
    src = sub.add_parser("source", help="add, test or remove a source", parents=[common])
    ssub = src.add_subparsers(dest="source_verb", metavar="ACTION")
    p = verb("add", source_add, "register a source (reached and tested first)", ssub)
    p.add_argument("name")
    p.add_argument("--kind", required=True, choices=["libvirt", "nbd", "vsphere", "linux-agent"])
    p.add_argument(
        "--uri",
        required=True,
        help="qemu:///system, qemu+ssh://host/system, nbd+unix:///?socket=..., https://vcenter",
    )
    p.add_argument("--user")
    p.add_argument(
        "--password-file",
        help="read the password (linux-agent: the SSH private key) from this file",
    )
    p.add_argument("--password-stdin", action="store_true")
    p.add_argument(
        "--key-file",
        help="linux-agent: read the SSH private key from this file (stored encrypted)",
    )
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--thumbprint", help="SHA-256 of the certificate, confirmed by you")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="no TLS certificate check (recorded in events and the audit log)",
    )
    p.add_argument("--no-test", action="store_true", help="save without reaching the source")
    p = verb("edit", source_edit, "change a source in place (tested first)", ssub)
    p.add_argument("name")
    p.add_argument("--rename", metavar="NEW_NAME")
    p.add_argument("--uri", help="a new address: its certificate or host key is asked again")
    p.add_argument("--user")
    p.add_argument("--password-file", help="a new password (linux-agent: SSH private key)")
    p.add_argument("--password-stdin", action="store_true")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--unset-param", action="append", default=[], metavar="KEY")
    p.add_argument("--throttle", type=parse_rate, help="cap of every sync from it: 50MiB, 100mbit")
    p.add_argument("--no-throttle", action="store_true")
    p.add_argument("--thumbprint", help="SHA-256 of the new certificate, confirmed by you")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", default=None, help="no TLS check")
    tls.add_argument("--secure", dest="insecure", action="store_false", help="check TLS again")
    p.add_argument("--no-test", action="store_true", help="save without reaching the source")
    p = verb("tls", source_tls, "show the certificate a vCenter presents", ssub)
    p.add_argument("uri")
    p = verb("hostkey", source_hostkey, "show the SSH host key a server presents", ssub)
    p.add_argument("uri")
    p = verb("test", source_test, "reach a source and log in", ssub)
    p.add_argument("name")
    p = verb("remove", source_remove, "remove a source and its unprotected machines", ssub)
    p.add_argument("name")
    p.add_argument(
        "--purge",
        action="store_true",
        help="also delete its machines' restore points from the volume store",
    )

    p = verb("discover", discover, "list the machines of a source into the store")
    p.add_argument("source")
    p.add_argument("--wait", action="store_true")
    verb("machines", machines, "machines, protection and RPO state")
    mach = sub.add_parser("machine", help="details of one machine", parents=[common])
    msub = mach.add_subparsers(dest="machine_verb", metavar="ACTION")
    p = verb("show", machine_show, "disks, settings, restore points", msub)
    p.add_argument("name")

    for name, handler, help_ in (
        ("protect", protect, "start protecting a machine"),
        ("set", set_machine, "change RPO target or throttle"),
    ):
        p = verb(name, handler, help_)
        p.add_argument("name")
        p.add_argument("--rpo", type=parse_duration, help="RPO target, e.g. 15m")
        p.add_argument("--throttle", type=parse_rate, help="e.g. 50MiB or 100mbit")
        if name == "protect":
            p.add_argument("--verify-every-sync", action="store_true")
        else:
            p.add_argument("--no-throttle", action="store_true")
    p = verb("unprotect", unprotect, "stop protecting (restore points are kept)")
    p.add_argument("name")
    p = verb("sync", sync, "sync a machine now (incremental unless --full)")
    p.add_argument("name")
    p.add_argument("--full", action="store_true")
    p.add_argument("--wait", action="store_true")
    p = verb("points", points, "restore points of a machine")
    p.add_argument("name")
    pt = sub.add_parser("point", help="act on one restore point", parents=[common])
    psub = pt.add_subparsers(dest="point_verb", metavar="ACTION")
    p = verb("delete", point_delete, "delete the newest restore point", psub)
    p.add_argument("id", type=int)
    p = verb("verify", verify, "compare a restore point with its source, block by block")
    p.add_argument("id", type=int)
    p.add_argument("--wait", action="store_true")
    p = verb("inspect", inspect, "inspect a restore point's guest (libguestfs) and store it")
    p.add_argument("id", type=int)
    p = verb("preflight", preflight, "can this restore point be converted? blockers, warnings")
    p.add_argument("machine")
    p.add_argument("id", type=int)
    p = verb(
        "convert", convert, "convert a restore point onto a new overlay (the chain is only read)"
    )
    p.add_argument("id", type=int)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", help="the new qcow2 file")
    target.add_argument(
        "--preview", action="store_true", help="does it convert? onto a throw-away overlay"
    )
    p.add_argument("--backend", choices=["builtin", "virt-v2v"])
    p.add_argument("--wait", action="store_true")
    p = verb("audit-log", audit_show, "who did what, from where")
    p.add_argument("--limit", type=int, default=50)
