"""Boot-verified restore points: convert a point on throw-away overlays, boot it with no
network, run the readiness checks that need no network, record the verdict.

    ferryman verify-boot web01 [--point 7]         now (job kind "bootverify")
    ferryman verify-boot web01 --auto every-sync   after each sync (the scheduler's tick)
    ferryman verify-boot web01 --auto schedule --every 12h

What one verification does:

    1. the point's disks get overlays under <volume store>/preconverted/machine-N/ (each holds
       a reader on its chain point: retention never merges under it); the boot disk is
       converted the way the newest plan naming the machine converts it (backend, host
       name, addresses), or with the defaults when no plan names it
    2. a second, thin overlay over each (the boot writes there, never into the conversion)
    3. a transient libvirt domain (type from the KVM probe: 'qemu' = TCG here) with NO network
       interface, its serial console in <state dir>/boot-verify/<machine>/rpN.console.log
    4. the plan's console and guest-agent checks (TCP checks need a network and are left to
       test runs), or the console boot marker when no plan names the machine
    5. restore_points.boot_verified = 'bootable' | 'not-bootable', boot_report = what happened
       (also written beside the console log as rpN.json); the domain and the thin overlays go
    6. a bootable point newer than the machine's pre-converted point becomes the new one
       (appliance/preconverted.py); otherwise the converted overlays go too

A guest the converter refuses (no kernel left, a damaged file system) is not bootable without
a boot: the report and rpN.json say why. Failures of the appliance itself (libvirt down, disk
full) fail the job and leave the point unjudged.

Bounded: the job kind is a singleton (one verification at a time on the appliance) and holds
no machine lock, so syncs, retention and test runs go on. With "every-sync", a point sealed
while another verification runs is skipped (an event says so); the next sync's point is
verified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance import inventory, preconverted
from appliance.config import paths
from appliance.convert import api as convert_api
from appliance.convert.errors import ConversionFailed, InspectError, PreflightRefused
from appliance.daemon.jobs import JobContext, JobRunner
from appliance.datapath.chain import DiskChain
from appliance.errors import Conflict, FerrymanError, NotFound
from appliance.plans import records as plan_records
from appliance.plans import virt
from appliance.plans.model import (
    DEFAULT_CONSOLE_PATTERN,
    DEFAULT_TIMEOUT_S,
    Check,
    MachinePlan,
    Plan,
    parse,
)
from appliance.plans.readiness import CheckResult, run_check
from appliance.plans.runner import (
    conversion_backend,
    customisation,
    domain_spec,
    machine_checks,
    machine_macs,
)
from appliance.replication import point_name
from store.db import dumps, loads, now
from store.records import add_event

log = logging.getLogger(__name__)

KIND = "bootverify"
POLICIES = ("off", "every-sync", "schedule")
DEFAULT_EVERY_S = 24 * 3600  # "schedule" without --every: once a day
MIN_EVERY_S = 600  # a boot under TCG takes minutes; more often than this is a busy loop
NO_NETWORK_CHECKS = ("console", "agent")  # what can pass on a guest without any NIC
# Guest problems: the point is judged not bootable. Anything else is the appliance's problem.
GUEST_ERRORS = (PreflightRefused, ConversionFailed, InspectError)


# Console lines that blame the host, not the guest: under TCG on a loaded host the kernel's
# early check of the IO-APIC timer can lose the race and panic (seen here at load 17 on 2
# cores, on a guest that booted fine before and after). Such a boot is tried again.
HOST_FAILURES = (re.compile(r"IO-APIC \+ timer doesn't work"),)
BOOT_ATTEMPTS = 3
# A verification is off the RTO path: a slow boot must not read as a failed one. Under TCG on
# a loaded 2-core host a boot to the marker took 280-370 s (plans default to 300 s).
MIN_TIMEOUT_S = {"qemu": 900, "kvm": 300}


def host_failure(results: list[CheckResult]) -> str | None:
    """The host-side failure a failed check shows, if any."""
    for r in results:
        if not r.passed:
            for pat in HOST_FAILURES:
                if pat.search(r.detail):
                    return r.detail[:200]
    return None


class BootVerifyError(FerrymanError):
    code = "bootverify"


def console_dir(machine: str) -> Path:
    """Kept after the verification: the console log and the report of each verified point."""
    return paths().state_dir / "boot-verify" / machine


def work_dir() -> Path:
    return paths().volume_dir / "boot-verify"


def domain_prefix(db: Database) -> str:
    return f"fm-{virt.instance_tag(db)}-b"


# -- which plan, which checks ----------------------------------------------------------------


def plan_for(
    db: Database, machine: str, plan: str | None = None
) -> tuple[Plan | None, MachinePlan]:
    """The plan whose conversion and checks apply: ``plan`` if given, else the newest saved
    plan naming the machine; without one, a default entry (builtin conversion, console
    marker)."""
    if plan is not None:
        doc = plan_records.get(db, plan)["document"]
        p = parse(doc)
        mp = next((m for m in p.machines if m.machine == machine), None)
        if mp is None:
            raise NotFound(
                f"plan '{plan}' does not name machine '{machine}'",
                hint="leave out --plan, or add the machine to the plan",
            )
        return p, mp
    seen: set[str] = set()
    for name, doc in db.execute("SELECT name, document FROM plans ORDER BY id DESC"):
        if name in seen:
            continue  # an older version of a plan already looked at
        seen.add(name)
        d = loads(doc) or {}
        if any(m.get("machine") == machine for m in d.get("machines", [])):
            p = parse(d)
            return p, next(m for m in p.machines if m.machine == machine)
    return None, MachinePlan(machine=machine, rank=1)


def boot_checks(mp: MachinePlan, min_timeout_s: int = 0) -> tuple[list[Check], list[str]]:
    """The checks that can pass without a network (each waiting at least ``min_timeout_s``),
    and the labels of those left out."""
    wanted = machine_checks(mp)
    keep = [
        dataclasses.replace(c, timeout_s=max(c.timeout_s, min_timeout_s))
        for c in wanted
        if c.type in NO_NETWORK_CHECKS
    ]
    skipped = [c.label for c in wanted if c.type not in NO_NETWORK_CHECKS]
    if not keep:
        keep = [
            Check(
                type="console",
                timeout_s=max(DEFAULT_TIMEOUT_S["console"], min_timeout_s),
                pattern=DEFAULT_CONSOLE_PATTERN,
            )
        ]
    return keep, skipped


# -- the job ---------------------------------------------------------------------------------


def _point(db: Database, machine_id: int, rp_id: int | None) -> dict[str, Any]:
    rps = inventory.restore_points(db, machine_id)
    if not rps:
        raise NotFound("the machine has no restore point", hint="sync it first")
    if rp_id is None:
        rp_id = int(rps[-1]["id"])
    rp = next((r for r in rps if r["id"] == rp_id), None)
    if rp is None or not rp["disks"]:
        raise NotFound(
            f"no restore point {rp_id} of this machine (merged or deleted?)",
            hint="list them with: ferryman points NAME",
        )
    return rp


def clean_leftovers(db: Database) -> list[str]:
    """Domains and thin overlays a crashed verification left (one runs at a time, so any
    found at the start of a job are debris)."""
    out: list[str] = []
    conn = virt.connect()
    try:
        for name in virt.leftovers(conn, domain_prefix(db))["domains"]:
            virt.destroy_domain(conn, name)
            out.append(f"domain {name}")
    finally:
        conn.close()
    wd = work_dir()
    for f in wd.glob("*.qcow2") if wd.exists() else []:
        f.unlink()
        out.append(str(f))
    kept = {d["path"] for r in preconverted.listing(db) for d in r["disks"]}
    pre_root = paths().volume_dir / "preconverted"
    for f in pre_root.glob("machine-*/*.qcow2") if pre_root.exists() else []:
        if str(f) not in kept:
            f.unlink()  # its reader goes with retention's drop_stale_overlay_readers
            out.append(str(f))
    return out


def _save_report(db: Database, rp_id: int, verdict: str | None, report: dict[str, Any]) -> None:
    db.execute(
        "UPDATE restore_points SET boot_verified=?, boot_verified_at=?, boot_report=? WHERE id=?",
        [verdict, now() if verdict else None, dumps(report), rp_id],
    )


class _Verification:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.m = inventory.machine_row(self.db, str(ctx.params["machine"]))
        rp = ctx.params.get("restore_point")
        self.rp = _point(self.db, self.m["id"], int(rp) if rp is not None else None)
        if self.rp["verified"] == "mismatch":
            raise BootVerifyError(
                f"restore point {self.rp['id']} of {self.m['name']} failed its hash verification",
                hint="do not boot it; sync again and verify the newer point",
            )
        self.plan, self.mp = plan_for(self.db, self.m["name"], ctx.params.get("plan"))
        macs = machine_macs(self.plan.name, self.mp, self.m) if self.plan else []
        self.custom = customisation(self.mp, macs) if self.plan else None
        self.backend = conversion_backend(self.mp, self.rp)
        self.key = preconverted.custom_key(self.backend, self.custom)
        self.cdir = console_dir(self.m["name"])
        self.console = self.cdir / f"rp{self.rp['id']}.console.log"
        self.disks: list[dict[str, Any]] = []  # the converted overlays and their readers
        self.tops: list[Path] = []
        self.domain = f"{domain_prefix(self.db)}{self.rp['id']}-{self.m['name']}"
        self.report: dict[str, Any] = {
            "job": ctx.job_id,
            "restore_point": self.rp["id"],
            "plan": self.plan.name if self.plan else None,
            "backend": self.backend,
            "reason": ctx.params.get("reason", "operator"),
            "started_at": now(),
        }

    def event(self, message: str, level: str = "info") -> None:
        add_event(
            self.db,
            message,
            level=level,
            kind="bootverify",
            machine_id=self.m["id"],
            job_id=self.ctx.job_id,
        )

    def phase(self, text: str) -> None:
        self.ctx.progress.set_phase(f"{self.m['name']} point {self.rp['id']}: {text}")

    # steps -----------------------------------------------------------------------------

    def convert(self) -> None:
        """Overlays for every disk (readers first), the boot disk converted."""
        for d in sorted(self.rp["disks"], key=lambda x: x["disk_key"]):
            path = Path(d["path"])
            chain = DiskChain(path.parent)
            point = point_name(int(self.rp["session_id"]))
            target = preconverted.staging_path(
                self.m["id"], self.rp["id"], d["disk_key"], self.ctx.job_id
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.unlink(missing_ok=True)
            rid = preconverted.hold(chain, point, target)
            self.disks.append(
                {
                    "disk_key": d["disk_key"],
                    "path": str(target),
                    "chain": str(chain.dir),
                    "point": point,
                    "reader": rid,
                }
            )
        t0 = time.monotonic()
        for i, (d, out) in enumerate(
            zip(sorted(self.rp["disks"], key=lambda x: x["disk_key"]), self.disks, strict=True)
        ):
            if i == 0 and self.backend != "none":

                def progress(step: str, fraction: float) -> None:
                    self.ctx.progress.set_phase(
                        f"{self.m['name']} point {self.rp['id']}: converting ({step})",
                        fraction=round(fraction, 2),
                    )

                res = convert_api.convert(
                    Path(d["path"]),
                    Path(out["path"]),
                    backend=self.backend,  # type: ignore[arg-type]
                    plan=self.custom,
                    progress=progress,
                    cancel=self.ctx.cancel,
                    log_dir=self.cdir,
                )
                self.report["conversion"] = {
                    "backend": res.backend,
                    "seconds": res.seconds,
                    "steps": res.steps,
                    "verify_ok": bool(res.verify.get("ok", True)),
                }
            else:
                convert_api.create_overlay(Path(d["path"]), Path(out["path"]))
        self.report["convert_s"] = round(time.monotonic() - t0, 1)

    def boot(self) -> tuple[bool, list[CheckResult]]:
        """Thin overlays, a domain without a network, the checks; the domain always goes."""
        wd = work_dir()
        wd.mkdir(parents=True, exist_ok=True)
        self.tops = []
        for d in self.disks:
            top = wd / f"rp{self.rp['id']}-{d['disk_key']}.qcow2"
            top.unlink(missing_ok=True)
            self.tops.append(convert_api.create_overlay(Path(d["path"]), top))
        self.console.unlink(missing_ok=True)
        xml = virt.domain_xml(
            domain_spec(
                self.db,
                self.mp,
                self.m,
                name=self.domain,
                title=f"ferryman boot verification of {self.m['name']} point {self.rp['id']}",
                disks=self.tops,
                console=self.console,
                nics=[],  # no network at all: the guest cannot reach production
                cache="unsafe",
                metadata={"kind": "bootverify", "machine": self.m["name"]},
            )
        )
        dtype = virt.domain_type(self.db)
        checks, skipped = boot_checks(self.mp, MIN_TIMEOUT_S.get(dtype, 0))
        self.report["checks_skipped"] = skipped
        results: list[CheckResult] = []
        conn = virt.connect()
        try:
            t0 = time.monotonic()
            virt.start_domain(conn, xml)
            self.phase("booting (no network)")
            ok = True
            for check in checks:
                r = run_check(
                    check,
                    conn=conn,
                    domain=self.domain,
                    console=self.console,
                    cancel=self.ctx.cancel,
                )
                results.append(r)
                if not r.passed:
                    ok = False
                    break
            self.report["boot_s"] = round(time.monotonic() - t0, 1)
            self.ctx.check_cancel()
            return ok, results
        finally:
            virt.destroy_domain(conn, self.domain)
            conn.close()
            for t in self.tops:
                t.unlink(missing_ok=True)

    def boot_with_retries(self) -> tuple[bool, list[CheckResult]]:
        """Boot again when the failure is the host's, not the guest's (see HOST_FAILURES);
        the console of each failed attempt is kept beside the last one."""
        attempt = 1
        while True:
            ok, results = self.boot()
            why = host_failure(results)
            if ok or why is None or attempt == BOOT_ATTEMPTS:
                return ok, results
            kept = self.console.with_suffix(f".attempt{attempt}.log")
            self.console.replace(kept)
            self.report.setdefault("retries", []).append({"why": why, "console_log": str(kept)})
            self.event(
                f"boot verification of point {self.rp['id']} of {self.m['name']}: the host "
                f"failed the guest ({why}); booting again (attempt {attempt + 1})",
                level="warning",
            )
            attempt += 1

    def run(self) -> dict[str, Any]:
        m, rp = self.m, self.rp
        self.cdir.mkdir(parents=True, exist_ok=True)
        left = clean_leftovers(self.db)
        if left:
            self.event(f"boot verification: removed leftovers of an interrupted one: {left}")
        _save_report(self.db, rp["id"], None, {**self.report, "state": "running"})
        verdict: str | None = None
        kept = False
        try:
            self.phase(f"converting ({self.backend})")
            try:
                self.convert()
            except GUEST_ERRORS as e:
                verdict = "not-bootable"
                self.report["detail"] = f"conversion refused: {e.message}"
                self.report["hint"] = e.hint
            if verdict is None:
                ok, results = self.boot_with_retries()
                verdict = "bootable" if ok else "not-bootable"
                self.report["checks"] = [r.to_dict() for r in results]
                self.report["console_log"] = str(self.console)
                last = results[-1] if results else None
                self.report["detail"] = (
                    f"all {len(results)} checks passed"
                    if ok
                    else f"{last.check}: {last.detail}"
                    if last
                    else "no check ran"
                )
            self.report["state"] = "done"
            self.report["ended_at"] = now()
            _save_report(self.db, rp["id"], verdict, self.report)
            (self.cdir / f"rp{rp['id']}.json").write_text(
                json.dumps({"verdict": verdict, **self.report}, indent=2) + "\n"
            )
            if verdict == "bootable":
                kept = self._keep()
        except BaseException as e:
            if verdict is None:
                self.report.update({"state": "error", "error": str(e), "ended_at": now()})
                with contextlib.suppress(Exception):
                    _save_report(self.db, rp["id"], None, self.report)
            raise
        finally:
            if not kept:
                preconverted.release(self.disks)
        level = "info" if verdict == "bootable" else "error"
        self.event(
            f"restore point {rp['id']} of {m['name']} is {verdict.upper()}: "
            f"{self.report['detail']}"
            + (f" (console log: {self.console})" if "console_log" in self.report else "")
            + ("; kept pre-converted" if kept else ""),
            level=level,
        )
        return {
            "machine": m["name"],
            "restore_point": rp["id"],
            "boot_verified": verdict,
            "preconverted": kept,
            **{k: v for k, v in self.report.items() if k not in ("job", "restore_point")},
        }

    def _keep(self) -> bool:
        """Keep the converted overlays when this is the machine's newest bootable point."""
        cur = preconverted.current(self.db, self.m["id"])
        if cur is not None and cur["restore_point_id"] > self.rp["id"]:
            return False
        state = self.db.execute(
            "SELECT state FROM restore_points WHERE id=?", [self.rp["id"]]
        ).fetchone()
        if state is None or state[0] != "sealed":
            return False
        deleted = preconverted.keep(
            self.db,
            self.m["id"],
            self.rp["id"],
            self.disks,
            backend=self.backend,
            key=self.key,
            plan=self.plan.name if self.plan else None,
            convert_seconds=self.report.get("convert_s"),
            boot_seconds=self.report.get("boot_s"),
        )
        if deleted:
            log.info("previous pre-converted overlays deleted: %s", deleted)
        return True


def run_boot_verify(ctx: JobContext) -> dict[str, Any]:
    return _Verification(ctx).run()


# -- triggers --------------------------------------------------------------------------------


def set_policy(
    db: Database, machine: str, policy: str, every_s: int | None = None
) -> dict[str, Any]:
    m = inventory.machine_row(db, machine)
    if policy not in POLICIES:
        raise BootVerifyError(
            f"'{policy}' is not a boot verification policy for {m['name']}",
            hint=f"use one of: {', '.join(POLICIES)}",
        )
    if every_s is not None and every_s < MIN_EVERY_S:
        raise BootVerifyError(
            f"boot verification of {m['name']} every {every_s} s is too often",
            hint=f"use at least {MIN_EVERY_S // 60} minutes: a boot under TCG takes minutes",
        )
    if policy == "schedule" and every_s is None:
        every_s = m.get("boot_verify_every_s") or DEFAULT_EVERY_S
    db.execute(
        "UPDATE machines SET boot_verify=?, boot_verify_every_s=? WHERE id=?",
        [policy, every_s if policy == "schedule" else None, m["id"]],
    )
    return inventory.machine_row(db, str(m["id"]))


def submit(
    runner: JobRunner,
    db: Database,
    machine: str,
    *,
    restore_point: int | None = None,
    plan: str | None = None,
    who: str = "",
    origin: str = "",
    reason: str = "operator",
) -> dict[str, Any]:
    m = inventory.machine_row(db, machine)
    rp = _point(db, m["id"], restore_point)
    if plan is not None:
        plan_for(db, m["name"], plan)  # refuses a plan that does not name it, before queueing
    params = {"machine": m["id"], "restore_point": rp["id"], "reason": reason}
    if plan is not None:
        params["plan"] = plan
    return runner.submit(KIND, params=params, who=who, origin=origin)


def _active(db: Database) -> tuple[int, dict[str, Any]] | None:
    row = db.execute(
        "SELECT id, params FROM jobs WHERE kind=? AND state IN ('queued','running') "
        "ORDER BY id LIMIT 1",
        [KIND],
    ).fetchone()
    return (int(row[0]), loads(row[1]) or {}) if row else None


def _age_s(ts: str | None) -> float | None:
    if not ts:
        return None
    from datetime import UTC, datetime

    return (datetime.now(UTC) - datetime.fromisoformat(ts)).total_seconds()


def _interrupted(db: Database, mid: int, name: str, rp_id: int, report: dict[str, Any]) -> None:
    """A verification whose job is no longer active but never wrote its verdict (the daemon
    stopped under it): say so once; it is not retried by itself."""
    if report.get("state") != "running":
        return
    row = db.execute("SELECT state FROM jobs WHERE id=?", [report.get("job")]).fetchone()
    if row is not None and row[0] in ("queued", "running"):
        return
    db.execute(
        "UPDATE restore_points SET boot_report=? WHERE id=?",
        [dumps({**report, "state": "interrupted"}), rp_id],
    )
    add_event(
        db,
        f"boot verification of restore point {rp_id} of {name} was interrupted (job "
        f"{report.get('job')}); run it again: ferryman verify-boot {name} --point {rp_id}",
        level="warning",
        kind="bootverify",
        machine_id=mid,
    )


def tick(db: Database, runner: JobRunner) -> list[int]:
    """The scheduler's pass: start the verifications that are due; returns their points.

    every-sync  the newest point, once, unless another verification runs: then it is marked
                skipped (boot_report {"skipped": ...}) with an event
    schedule    the newest unjudged point when the last verdict is older than the interval;
                while another verification runs it simply waits for the next tick
    """
    started: list[int] = []
    preconverted.collect(db)  # retired overlays a finished test run no longer reads
    rows = db.execute(
        "SELECT id, name, boot_verify, boot_verify_every_s FROM machines WHERE "
        "boot_verify != 'off' AND cutover_done=0 ORDER BY id"
    ).fetchall()
    for mid, name, policy, every_s in rows:
        newest = db.execute(
            "SELECT id, boot_report FROM restore_points WHERE machine_id=? AND state='sealed' "
            "ORDER BY id DESC LIMIT 1",
            [mid],
        ).fetchone()
        if newest is None:
            continue
        rp_id = int(newest[0])
        if newest[1] is not None:
            _interrupted(db, mid, name, rp_id, loads(newest[1]) or {})
            continue  # judged, running, skipped or interrupted already
        if policy == "schedule":
            last = db.execute(
                "SELECT max(boot_verified_at) FROM restore_points WHERE machine_id=?", [mid]
            ).fetchone()[0]
            age = _age_s(last)
            if age is not None and age < float(every_s or DEFAULT_EVERY_S):
                continue
        active = _active(db)
        if active is not None and active[1].get("restore_point") == rp_id:
            continue  # queued for this very point, not started yet
        if active is None:
            try:
                submit(
                    runner,
                    db,
                    str(mid),
                    restore_point=rp_id,
                    who="scheduler",
                    origin=policy,
                    reason=policy,
                )
                started.append(rp_id)
                continue
            except Conflict:
                active = _active(db)
        if policy == "every-sync":
            busy = (
                f"job {active[0]} was still verifying point {active[1].get('restore_point')}"
                if active
                else "another verification was starting"
            )
            db.execute(
                "UPDATE restore_points SET boot_report=? WHERE id=?",
                [dumps({"skipped": busy, "at": now()}), rp_id],
            )
            add_event(
                db,
                f"boot verification of restore point {rp_id} of {name} skipped: {busy} "
                f"(verify it by hand: ferryman verify-boot {name} --point {rp_id})",
                level="warning",
                kind="bootverify",
                machine_id=mid,
            )
    return started
