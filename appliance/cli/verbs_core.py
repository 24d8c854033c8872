"""Core verbs: status, jobs, events, doctor, probe, store, audit, api."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from appliance.cli import Output, table, verb_adder
from appliance.client import Client
from appliance.config import paths
from appliance.errors import FerrymanError
from appliance.units import human_bytes


def _progress(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    if job["state"] != "running":
        return job.get("error") or ""
    parts = [p.get("phase", "")]
    if p.get("total"):
        parts.append(f"{100 * p['done'] / p['total']:.0f}% of {human_bytes(p['total'])}")
    if p.get("rate"):
        parts.append(f"{human_bytes(p['rate'])}/s")
    if p.get("eta_s") is not None:
        parts.append(f"ETA {p['eta_s']:.0f} s")
    return ", ".join(x for x in parts if x)


def _jobs_text(jobs: list[dict[str, Any]]) -> str:
    if not jobs:
        return "no jobs"
    return table(
        [
            (
                j["id"],
                j["kind"],
                j["machine_id"] or "",
                j["state"],
                j["created_at"][:19],
                _progress(j),
            )
            for j in jobs
        ],
        ["ID", "KIND", "MACHINE", "STATE", "CREATED", "PROGRESS / ERROR"],
    )


def status(args: argparse.Namespace) -> Output:
    with Client() as c:
        h = c.health()
        jobs = c.jobs(active=True)
    probe = h.get("probe") or {}
    text = (
        f"ferrymand {h['version']} pid {h['pid']} since {h['started_at'][:19]}\n"
        f"store {h['store']} (schema {h['schema']})\n"
        f"accelerator: {probe.get('accel', 'not probed yet')}\n\n" + _jobs_text(jobs)
    )
    return Output({"health": h, "jobs": jobs}, text)


def jobs(args: argparse.Namespace) -> Output:
    with Client() as c:
        js = c.jobs(active=not args.all, limit=args.limit)
    return Output(js, _jobs_text(js))


def job_show(args: argparse.Namespace) -> Output:
    with Client() as c:
        j = c.wait(args.id) if args.wait else c.job(args.id)
    lines = [f"{k}: {json.dumps(v) if isinstance(v, dict | list) else v}" for k, v in j.items()]
    code = 0 if j["state"] in ("succeeded", "queued", "running") else 1
    return Output(j, "\n".join(lines), code)


def job_cancel(args: argparse.Namespace) -> Output:
    with Client() as c:
        j = c.cancel(args.id)
    return Output(j, f"job {args.id}: cancel requested")


def events(args: argparse.Namespace) -> Output:
    with Client() as c:
        ev = c.events(since=args.since, machine=args.machine, limit=args.limit)
    text = (
        "\n".join(f"{e['ts'][:19]} {e['level']:<7} {e['kind']:<8} {e['message']}" for e in ev)
        or "no events"
    )
    return Output(ev, text)


def doctor(args: argparse.Namespace) -> Output:
    from appliance import doctor as d

    checks = d.run(quick=args.quick)
    data = d.to_json(checks)
    text = table(
        [(c.part, c.verdict.upper(), c.detail, c.fix) for c in checks],
        ["PART", "VERDICT", "DETAIL", "FIX"],
    )
    return Output(data, text, 0 if data["ok"] else 1)


def probe(args: argparse.Namespace) -> Output:
    with Client() as c:
        j = c.submit("probe")
        if args.wait:
            j = c.wait(j["id"])
            r = j.get("result") or {}
            return Output(
                j,
                f"accelerator: {r.get('accel')} (KVM: {r.get('kvm_detail')}; "
                f"TCG: {r.get('tcg_detail')})",
                0 if j["state"] == "succeeded" else 1,
            )
    return Output(j, f"probe job {j['id']} started; follow it with: ferryman job show {j['id']}")


def store_backup(args: argparse.Namespace) -> Output:
    from store.db import backup, open_readonly

    dest = Path(args.file).resolve()
    db = open_readonly(paths().db)
    try:
        backup(db, dest)
    finally:
        db.close()
    size = dest.stat().st_size
    return Output(
        {"file": str(dest), "bytes": size},
        f"store backed up to {dest} ({human_bytes(size)}), integrity ok",
    )


def store_check(args: argparse.Namespace) -> Output:
    from store.db import integrity, open_readonly, schema_version

    db = open_readonly(paths().db)
    try:
        res, ver = integrity(db), schema_version(db)
    finally:
        db.close()
    ok = res == ["ok"]
    return Output(
        {"ok": ok, "integrity": res, "schema": ver},
        f"{paths().db}: schema {ver}, integrity {'ok' if ok else res[0]}",
        0 if ok else 1,
    )


def store_seal_key(args: argparse.Namespace) -> Output:
    from store.secrets import KEY_NAME, Vault

    v = Vault(paths().db.parent / KEY_NAME)
    msg = v.seal_existing()
    return Output({**v.describe(), "message": msg}, msg)


def _export_rows(path: Path) -> list[dict[str, Any]]:
    """The entries of an export file (JSON lines or CSV, told apart by the first byte)."""
    import csv

    text = path.read_text()
    if text.lstrip().startswith("{"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(text.splitlines()))
    for r in rows:
        r["id"] = int(r["id"])
    return rows


def audit_verify(args: argparse.Namespace) -> Output:
    from store.db import open_readonly
    from store.records import audit_verify as verify
    from store.records import verify_entries

    if args.export:
        rows = _export_rows(Path(args.export))
        ok, why = verify_entries(rows, from_genesis=bool(rows) and rows[0]["id"] == 1)
        return Output(
            {"ok": ok, "detail": why},
            (f"export {args.export} intact: " if ok else f"export {args.export} BROKEN: ") + why,
            0 if ok else 1,
        )
    db = open_readonly(Path(args.store) if args.store else paths().db)
    try:
        ok, why = verify(db)
    finally:
        db.close()
    return Output(
        {"ok": ok, "detail": why},
        ("audit trail intact: " if ok else "audit trail BROKEN: ") + why,
        0 if ok else 1,
    )


def audit_export(args: argparse.Namespace) -> Output:
    import csv
    import io

    from store.records import AUDIT_COLUMNS, verify_entries

    fmt = args.format or ("csv" if args.to.endswith(".csv") else "jsonl")
    with Client() as c:
        rows = c.audit_export(args.since)["entries"]
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(AUDIT_COLUMNS), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        data = buf.getvalue()
    else:
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    dest = Path(args.to).resolve()
    part = dest.with_name(dest.name + ".part")
    part.write_text(data)
    part.replace(dest)
    ok, why = verify_entries(rows, from_genesis=bool(rows) and rows[0]["id"] == 1)
    out = {"file": str(dest), "format": fmt, "entries": len(rows), "ok": ok, "detail": why}
    return Output(
        out, f"{len(rows)} audit entries written to {dest} ({fmt}); {why}", 0 if ok else 1
    )


def api_schema(args: argparse.Namespace) -> Output:
    with Client() as c:
        schema = c.openapi()
    return Output(schema, json.dumps(schema, indent=2))


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    verb = verb_adder(sub, common)

    verb("status", status, "daemon, accelerator and running jobs")
    p = verb("jobs", jobs, "list jobs (running ones unless --all)")
    p.add_argument("--all", action="store_true")
    p.add_argument("--limit", type=int, default=50)

    job = sub.add_parser("job", help="show, wait for or cancel one job", parents=[common])
    jsub = job.add_subparsers(dest="job_verb", metavar="ACTION")
    p = verb("show", job_show, "show a job", jsub)
    p.add_argument("id", type=int)
    p.add_argument("--wait", action="store_true", help="block until it ends")
    p = verb("cancel", job_cancel, "cancel a job", jsub)
    p.add_argument("id", type=int)

    p = verb("events", events, "what happened, newest last")
    p.add_argument("--since", type=int, default=0, help="only events after this id")
    p.add_argument("--machine")
    p.add_argument("--limit", type=int, default=50)

    p = verb("doctor", doctor, "check every part of the appliance")
    p.add_argument(
        "--quick", action="store_true", help="skip the slow checks (libguestfs launch, KVM probe)"
    )
    p = verb("probe", probe, "re-run the KVM probe in the daemon")
    p.add_argument("--wait", action="store_true")

    st = sub.add_parser("store", help="back up or check the state store", parents=[common])
    ssub = st.add_subparsers(dest="store_verb", metavar="ACTION")
    p = verb("backup", store_backup, "consistent copy of the store (safe while running)", ssub)
    p.add_argument("file")
    verb("check", store_check, "integrity check of the store", ssub)
    verb("seal-key", store_seal_key, "seal the secret key file with systemd-creds (root)", ssub)

    au = sub.add_parser("audit", help="the audit trail", parents=[common])
    asub = au.add_subparsers(dest="audit_verb", metavar="ACTION")
    p = verb("verify", audit_verify, "detect edited or deleted audit entries", asub)
    p.add_argument("--store", help="verify this store file instead of the live one")
    p.add_argument("--export", help="verify an export file (audit export) instead")
    p = verb("export", audit_export, "the audit trail with its hashes, for the customer", asub)
    p.add_argument("--to", required=True, metavar="FILE", help=".csv or JSON lines (.jsonl)")
    p.add_argument("--since", metavar="WHEN", help="ISO date or time (UTC): 2026-11-01")
    p.add_argument("--format", choices=["jsonl", "csv"], help="default: by FILE's ending")

    verb("api-schema", api_schema, "print the daemon's OpenAPI schema")


_ = FerrymanError  # re-exported for verb modules
