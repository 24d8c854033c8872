"""Verbs of boot verification and pre-converted points.

ferryman verify-boot MACHINE [--point RP] [--plan PLAN] [--wait]
ferryman verify-boot MACHINE --auto every-sync|schedule|off [--every 12h]
ferryman preconverted [--drop MACHINE]
"""

from __future__ import annotations

import argparse
from typing import Any

from appliance.cli import Output, table, verb_adder
from appliance.cli.verbs_machines import parse_duration
from appliance.client import Client


def verify_boot(args: argparse.Namespace) -> Output:
    with Client() as c:
        if args.auto:
            m = c.set_boot_verify(args.machine, args.auto, args.every)
            when = {
                "off": "off",
                "every-sync": "after every sync",
                "schedule": f"every {m['boot_verify_every_s']} s",
            }[m["boot_verify"]]
            return Output(m, f"{m['name']}: boot verification {when}")
        job = c.verify_boot(args.machine, restore_point=args.point, plan=args.plan)
        if not args.wait:
            return Output(
                job,
                f"boot verification of {args.machine}: job {job['id']} started; follow it "
                f"with: ferryman job show {job['id']} --wait",
            )
        job = c.wait(job["id"])
    r = job.get("result") or {}
    if job["state"] != "succeeded":
        return Output(job, f"boot verification job {job['id']} {job['state']}: {job['error']}", 1)
    text = (
        f"restore point {r['restore_point']} of {r['machine']}: {r['boot_verified']} "
        f"({r.get('detail')})"
    )
    if r.get("console_log"):
        text += f"\nconsole log: {r['console_log']}"
    if r.get("preconverted"):
        text += "\nkept as the pre-converted point: a failover to it needs no conversion"
    return Output(job, text, 0 if r["boot_verified"] == "bootable" else 1)


def _rows(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no pre-converted points (ferryman verify-boot MACHINE makes one)"
    return table(
        [
            (
                r["machine"],
                r["restore_point_id"],
                r["state"],
                r["backend"],
                r["plan"] or "-",
                r["convert_seconds"],
                r["boot_seconds"],
                r["created_at"][:19],
            )
            for r in rows
        ],
        ["MACHINE", "POINT", "STATE", "BACKEND", "PLAN", "CONVERT S", "BOOT S", "SINCE (UTC)"],
    )


def preconverted(args: argparse.Namespace) -> Output:
    with Client() as c:
        if args.drop:
            r = c.drop_preconverted(args.drop)
            return Output(
                r, f"{r['machine']}: pre-converted point dropped ({len(r['deleted'])} files)"
            )
        rows = c.preconverted()
    return Output(rows, _rows(rows))


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    verb = verb_adder(sub, common)
    p = verb(
        "verify-boot",
        verify_boot,
        "convert a restore point, boot it with no network, mark it bootable or not",
    )
    p.add_argument("machine")
    p.add_argument("--point", type=int, help="restore point id (default: the newest)")
    p.add_argument("--plan", help="whose conversion and checks (default: newest plan naming it)")
    p.add_argument("--wait", action="store_true")
    p.add_argument(
        "--auto",
        choices=["every-sync", "schedule", "off"],
        help="set the automatic verification instead of running one now",
    )
    p.add_argument("--every", type=parse_duration, help="with --auto schedule, e.g. 12h")
    p = verb("preconverted", preconverted, "pre-converted points (failover without conversion)")
    p.add_argument("--drop", metavar="MACHINE", help="delete a machine's pre-converted point")
