"""Verbs for DR plans, test runs and cutover.

ferryman plan new NAME [--machine M ...] [--output FILE]
ferryman plan validate FILE           every problem: JSON path, what, fix (exit 1 if any)
ferryman plan save FILE [--name NAME] a new version when the document changed
ferryman plan show NAME [--version N] [--output FILE]
ferryman plan list
ferryman plan diff NAME [--from N] [--to M]
ferryman testrun start PLAN [--wait]  ferryman testrun show RUN | list | cancel RUN
ferryman testrun report RUN [--format text|json] [--output FILE]
ferryman cutover start PLAN [--mode guided|step] [--shutdown-timeout 5m]
ferryman cutover confirm RUN STEP [--wait]
ferryman cutover rollback RUN [--wait]
ferryman cutover approve RUN [--confirm PLAN]   (a second operator, when the policy asks)
ferryman cutover policy [--two-operators on|off]
ferryman cutover status RUN | list
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from appliance.cli import Output, table
from appliance.cli.verbs_machines import parse_duration
from appliance.client import Client
from appliance.errors import FerrymanError

RUN_DONE = ("succeeded", "failed", "cancelled", "interrupted")
CUTOVER_SETTLED = ("awaiting", "failed", "interrupted", "committed", "rolled-back")


def _read(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text() if path != "-" else __import__("sys").stdin.read()
    except OSError as e:
        raise FerrymanError(f"cannot read {path}: {e.strerror}", hint="check the path") from e
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise FerrymanError(
            f"{path} is not JSON: line {e.lineno} column {e.colno}: {e.msg}",
            hint="fix the syntax; `ferryman plan new NAME` writes a valid starting point",
        ) from e
    if not isinstance(doc, dict):
        raise FerrymanError(f"{path} holds a {type(doc).__name__}, not a plan object", hint="{...}")
    return doc


def _write(path: str | None, data: Any) -> str | None:
    if not path:
        return None
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
    return path


def _problems_text(problems: list[dict[str, str]]) -> str:
    return "\n".join(f"{p['path']}: {p['message']}\n    fix: {p['fix']}" for p in problems)


def plan_new(args: argparse.Namespace) -> Output:
    with Client() as c:
        doc = c.new_plan(args.name, args.machine or None)
    if _write(args.output, doc):
        return Output(
            doc,
            f"plan {args.name} written to {args.output}; edit it, then: "
            f"ferryman plan validate {args.output}",
        )
    return Output(doc, json.dumps(doc, indent=2))


def plan_validate(args: argparse.Namespace) -> Output:
    doc = _read(args.file)
    with Client() as c:
        r = c.validate_plan(doc)
    if r["ok"]:
        return Output(r, f"{args.file}: plan {doc.get('name')} is valid")
    n = len(r["problems"])
    return Output(
        r, f"{args.file}: {n} problem{'s' if n > 1 else ''}\n" + _problems_text(r["problems"]), 1
    )


def plan_save(args: argparse.Namespace) -> Output:
    doc = _read(args.file)
    name = args.name or doc.get("name")
    if not name:
        raise FerrymanError(f"{args.file} has no name", hint='add "name" or pass --name')
    with Client() as c:
        try:
            r = c.save_plan(str(name), doc)
        except FerrymanError as e:
            if e.code == "plan.invalid":
                v = c.validate_plan(doc)
                return Output(
                    {"error": e.to_dict(), **v},
                    f"plan {name} NOT saved:\n" + _problems_text(v["problems"]),
                    1,
                )
            raise
    text = (
        f"plan {name} unchanged (version {r['version']})"
        if r.get("unchanged")
        else f"plan {name} saved as version {r['version']}"
    )
    return Output(r, text)


def plan_show(args: argparse.Namespace) -> Output:
    with Client() as c:
        p = c.plan(args.name, args.version)
    if _write(args.output, p["document"]):
        return Output(p, f"plan {args.name} v{p['version']} written to {args.output}")
    return Output(p, json.dumps(p["document"], indent=2))


def plan_list(args: argparse.Namespace) -> Output:
    with Client() as c:
        rows = c.plans()
    text = table(
        [
            (
                p["name"],
                p["version"],
                p["updated_at"][:19],
                f"{p['last_run']['kind']} {p['last_run']['id']}: {p['last_run']['state']}"
                if p["last_run"]
                else "",
            )
            for p in rows
        ],
        ["PLAN", "VERSION", "UPDATED (UTC)", "LAST RUN"],
    )
    return Output(rows, text if rows else "no plans; start one: ferryman plan new NAME")


def plan_diff(args: argparse.Namespace) -> Output:
    with Client() as c:
        d = c.plan_diff(args.name, args.a, args.b)
    head = f"plan {args.name}: v{d['from']} -> v{d['to']}"
    body = "\n".join(f"  {x}" for x in d["changes"]) or "  no changes"
    return Output(d, f"{head}\n{body}\n\n{d['unified']}".rstrip())


def _run_line(r: dict[str, Any]) -> str:
    t = (r.get("report") or {}).get("totals") or {}
    rto = f"RTO {t['rto_s']:.1f}s" if t.get("rto_s") else ""
    return (
        f"run {r['id']} of {r['plan']} v{r['version']}: {r['state']} ({r['step']}) {rto}".rstrip()
    )


def testrun_start(args: argparse.Namespace) -> Output:
    with Client() as c:
        r = c.test_run(args.plan, args.version, preconverted=not args.convert)
        if args.wait:
            r = c.wait_run(r["id"], until=RUN_DONE, timeout=args.timeout)
            text = c.test_run_report_text(r["id"])
            return Output(r, text, 0 if r["state"] == "succeeded" else 1)
    return Output(
        r,
        f"test run {r['id']} started (job {r['job']['id']}); follow it with: "
        f"ferryman testrun show {r['id']}",
    )


def testrun_show(args: argparse.Namespace) -> Output:
    with Client() as c:
        r = c.test_run_show(args.run)
        return Output(r, c.test_run_report_text(args.run))


def testrun_list(args: argparse.Namespace) -> Output:
    with Client() as c:
        rows = c.test_runs(args.plan)
    return Output(rows, "\n".join(_run_line(r) for r in rows) or "no test runs")


def testrun_report(args: argparse.Namespace) -> Output:
    with Client() as c:
        r = c.test_run_show(args.run)
        text = c.test_run_report_text(args.run)
    if args.output:
        Path(args.output).write_text(
            text if args.format == "text" else json.dumps(r, indent=2) + "\n"
        )
        return Output(r, f"report of run {args.run} written to {args.output}")
    return Output(r, text if args.format == "text" else json.dumps(r, indent=2))


def testrun_cancel(args: argparse.Namespace) -> Output:
    with Client() as c:
        r = c.test_run_cancel(args.run)
    return Output(r, f"test run {args.run}: cancel requested; clean-up follows")


def _cutover_text(r: dict[str, Any], c: Client) -> str:
    text = c.cutover_report_text(r["id"])
    if r.get("confirm"):
        text += f"\nnext: {r['next']}   confirm with: {r['confirm']}"
    if r.get("waiting_for"):
        text += f"\nwaiting for {r['waiting_for']}"
    return text


def cutover_start(args: argparse.Namespace) -> Output:
    with Client() as c:
        r = c.cutover_start(
            args.plan,
            version=args.version,
            mode=args.mode,
            shutdown_timeout_s=args.shutdown_timeout,
            use_preconverted=args.use_preconverted,
        )
        return Output(r, "preflight passed\n" + _cutover_text(r, c))


def _wait_cutover(c: Client, run_id: int, timeout: float | None) -> dict[str, Any]:
    c.wait_run(run_id, until=CUTOVER_SETTLED, timeout=timeout)
    return c.cutover_status(run_id)


def cutover_confirm(args: argparse.Namespace) -> Output:
    with Client() as c:
        r = c.cutover_confirm(args.run, args.step)
        if args.wait:
            r = _wait_cutover(c, args.run, args.timeout)
            ok = r["state"] in ("awaiting", "committed")
            return Output(r, _cutover_text(r, c), 0 if ok else 1)
        return Output(r, f"cutover {args.run}: {args.step} started (job {r['job']['id']})")


def cutover_rollback(args: argparse.Namespace) -> Output:
    with Client() as c:
        r = c.cutover_rollback_run(args.run)
        if args.wait:
            r = _wait_cutover(c, args.run, args.timeout)
            return Output(r, _cutover_text(r, c), 0 if r["state"] == "rolled-back" else 1)
        return Output(r, f"cutover {args.run}: rollback started (job {r['job']['id']})")


def cutover_approve(args: argparse.Namespace) -> Output:
    with Client() as c:
        typed = args.confirm
        if typed is None:
            run = c.cutover_status(args.run)
            typed = input(f"approve cutover {args.run}: type the plan's name ({run['plan']}): ")
        r = c.cutover_approve(args.run, typed.strip())
        return Output(
            r,
            f"cutover {args.run} of {r['plan']} approved by {r['approval']['approved_by']} "
            f"(requested by {r['approval']['requested_by']}); next: {r['confirm']}",
        )


def cutover_policy(args: argparse.Namespace) -> Output:
    with Client() as c:
        if args.two_operators is None:
            r = c.cutover_policy()
        else:
            r = c.set_cutover_policy(two_operators=args.two_operators == "on")
    word = "needs a second operator's approval" if r["two_operators"] else "needs one operator"
    return Output(r, f"a cutover {word}")


def cutover_status(args: argparse.Namespace) -> Output:
    with Client() as c:
        r = c.cutover_status(args.run)
        return Output(r, _cutover_text(r, c))


def cutover_list(args: argparse.Namespace) -> Output:
    with Client() as c:
        rows = c.cutovers(args.plan)
    lines = [
        f"cutover {r['id']} of {r['plan']} v{r['version']}: {r['state']} at {r['step']}"
        + (f", next {r['next']}" if r.get("next") else "")
        for r in rows
    ]
    return Output(rows, "\n".join(lines) or "no cutovers")


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    def group(name: str, help_: str) -> Any:
        g = sub.add_parser(name, help=help_, parents=[common])
        return g.add_subparsers(dest=f"{name}_verb", metavar="ACTION")

    def verb(parent: Any, name: str, handler: Any, help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=help_, parents=[common])
        p.set_defaults(handler=handler)
        return p

    def waiting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--wait", action="store_true", help="block until it settles")
        p.add_argument("--timeout", type=parse_duration, default=None, help="e.g. 30m")

    plan = group("plan", "DR plans: create, validate, save, compare")
    p = verb(plan, "new", plan_new, "a starting plan from the protected machines")
    p.add_argument("name")
    p.add_argument("--machine", action="append", help="only these machines (repeatable)")
    p.add_argument("--output", "-o", help="write it to this file")
    p = verb(plan, "validate", plan_validate, "check a plan file; every problem with its fix")
    p.add_argument("file", help="plan JSON file, - for stdin")
    p = verb(plan, "save", plan_save, "store a plan file as a new version")
    p.add_argument("file")
    p.add_argument("--name", help="default: the document's name")
    p = verb(plan, "show", plan_show, "print (or write) a stored plan")
    p.add_argument("name")
    p.add_argument("--version", type=int)
    p.add_argument("--output", "-o")
    verb(plan, "list", plan_list, "plans, versions, last runs")
    p = verb(plan, "diff", plan_diff, "what changed between two versions")
    p.add_argument("name")
    p.add_argument("--from", dest="a", type=int, help="default: the version before --to")
    p.add_argument("--to", dest="b", type=int, help="default: the newest")

    tr = group("testrun", "isolated test runs of a plan with measured RTO")
    p = verb(tr, "start", testrun_start, "test-run a plan (clean-up always follows)")
    p.add_argument("plan")
    p.add_argument("--version", type=int)
    p.add_argument(
        "--convert",
        action="store_true",
        help="convert every machine, even where a pre-converted point would boot at once",
    )
    waiting(p)
    p = verb(tr, "show", testrun_show, "state, phases and checks of a run")
    p.add_argument("run", type=int)
    p = verb(tr, "list", testrun_list, "test runs, newest first")
    p.add_argument("--plan")
    p = verb(tr, "report", testrun_report, "the report as text or JSON")
    p.add_argument("run", type=int)
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.add_argument("--output", "-o")
    p = verb(tr, "cancel", testrun_cancel, "stop a test run (it cleans up)")
    p.add_argument("run", type=int)

    co = group("cutover", "the final switch-over, step by confirmed step")
    p = verb(co, "start", cutover_start, "preflight and open a cutover of a plan")
    p.add_argument("plan")
    p.add_argument("--version", type=int)
    p.add_argument(
        "--mode",
        choices=["guided", "step"],
        default="guided",
        help="guided: after stop-source the engine goes on to readiness without pausing",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=parse_duration,
        default=300,
        help="guest shutdown before a hard power-off (default 5m)",
    )
    p.add_argument(
        "--use-preconverted",
        action="store_true",
        help="no last delta: boot each machine's pre-converted point (RTO = boot time); you "
        "accept losing what the sources wrote since those points (their age is the RPO)",
    )
    p = verb(co, "confirm", cutover_confirm, "run the step the cutover waits for")
    p.add_argument("run", type=int)
    p.add_argument("step", help="final-delta, stop-source, last-delta, seal, bring-up, commit")
    waiting(p)
    p = verb(co, "rollback", cutover_rollback, "discard the target, start the sources again")
    p.add_argument("run", type=int)
    waiting(p)
    p = verb(co, "approve", cutover_approve, "a second operator approves a cutover")
    p.add_argument("run", type=int)
    p.add_argument("--confirm", metavar="PLAN", help="the plan's name (asked when left out)")
    p = verb(co, "policy", cutover_policy, "show or set: cutover needs two operators")
    p.add_argument("--two-operators", choices=["on", "off"], help="admin only")
    p = verb(co, "status", cutover_status, "steps, timings, downtime, what comes next")
    p.add_argument("run", type=int)
    p = verb(co, "list", cutover_list, "cutovers, newest first")
    p.add_argument("--plan")
