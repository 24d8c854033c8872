"""Cutover: a resumable state machine with operator confirmations and a rollback at every step.

    preflight      (at start)  plan valid, machines replicated, sources controllable, bridges
    final-delta    confirm     one more sync of every machine while the sources still run
    stop-source    confirm     libvirt: ACPI shutdown, destroy after the timeout; vSphere: guest
                               shutdown through Tools, power-off after the timeout; NBD: the
                               operator stopped it (the confirmation says so). Downtime starts.
    last-delta     auto*       the changes made until the stop; a stopped libvirt VM is started
                               PAUSED for its backup job (its CPUs never run) and destroyed again
    seal           auto*       the restore point of the last delta is the one that boots
    bring-up       auto*       convert, boot by plan on the production networks, readiness
    commit         confirm     the targets stay; the machines are marked cut over and are
                               never replicated (nor their sources started) again

    * in "guided" mode (the default) these follow stop-source without a pause, because every
      second there is downtime; in "step" mode each waits for its own confirmation.

The run row holds the state ("awaiting" the confirmation of ``next``, "running", "failed",
"interrupted", "committed", "rolled-back") and the report holds every step with its timing.
A failed or interrupted step is repeated by confirming it again; rollback works from any state
but "running" and "committed": the targets (domains, networks, disks) are discarded and every
source this cutover stopped is started again. Continuous protection of the plan's machines is
paused (RPO target cleared, restored on rollback) so a scheduled sync never races a delta.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance import evidence, inventory
from appliance.config import paths
from appliance.daemon.jobs import JobContext, JobRunner, Progress
from appliance.datapath.chain import DiskChain
from appliance.errors import Cancelled, FerrymanError
from appliance.plans import approval, records, virt
from appliance.plans.errors import CutoverRefused, RunError
from appliance.plans.model import Inventory, Plan, check_document
from appliance.plans.runner import PlanRun
from store.db import now, open_store

log = logging.getLogger(__name__)

STEPS = ["final-delta", "stop-source", "last-delta", "seal", "bring-up", "commit"]
CONFIRM = {"final-delta", "stop-source", "commit"}
AUTO_AFTER_STOP = ["last-delta", "seal", "bring-up"]
SHUTDOWN_TIMEOUT_S = 300.0  # guest shutdown before a hard power-off (Windows updates...)
# A delta step waits this long for a machine's running job (a scheduled sync, a verify) to end.
BUSY_WAIT_S = 1800.0
BUSY_POLL_S = 2.0
POWER_POLL_S = 1.0
FINAL = ("committed", "rolled-back")


def _next_step(step: str) -> str | None:
    i = STEPS.index(step)
    return STEPS[i + 1] if i + 1 < len(STEPS) else None


# -- source power --------------------------------------------------------------------------


@dataclass
class PowerOutcome:
    machine: str
    action: str  # guest-shutdown | power-off | already-off | manual | power-on | already-on
    seconds: float
    note: str = ""


def _source(db: Database, m: dict[str, Any]) -> dict[str, Any]:
    return inventory.source_row(db, str(m["source_id"]))


def _libvirt_dom(db: Database, m: dict[str, Any]) -> Any:
    from appliance.daemon.state import adapter_for

    adapter = adapter_for(db, _source(db, m))
    return adapter._dom(m["ref"])  # type: ignore[attr-defined]


def stop_source(db: Database, m: dict[str, Any], timeout: float) -> PowerOutcome:
    src = _source(db, m)
    t0 = time.monotonic()
    if src["kind"] == "libvirt":
        import libvirt

        dom = _libvirt_dom(db, m)
        if not dom.isActive():
            return PowerOutcome(m["name"], "already-off", 0.0)
        note = ""
        try:
            dom.shutdown()
            end = t0 + timeout
            while time.monotonic() < end:
                if not dom.isActive():
                    return PowerOutcome(m["name"], "guest-shutdown", time.monotonic() - t0)
                time.sleep(POWER_POLL_S)
            note = f"guest did not shut down within {timeout:.0f} s"
        except libvirt.libvirtError as e:
            note = f"shutdown refused: {e.get_error_message()}"
        log.warning("%s: %s; destroying", m["name"], note)
        try:
            dom.destroy()
        except libvirt.libvirtError as e:
            if dom.isActive():
                raise RunError(
                    f"source '{m['name']}' could not be powered off: {e.get_error_message()}",
                    hint="power it off on the KVM host, then confirm stop-source again",
                ) from e
        return PowerOutcome(m["name"], "power-off", time.monotonic() - t0, note)
    if src["kind"] == "vsphere":
        from appliance.daemon.state import adapter_for

        r = adapter_for(db, src).stop_machine(m["ref"], timeout)  # type: ignore[attr-defined]
        return PowerOutcome(m["name"], str(r.action), float(r.seconds), str(r.note))
    return PowerOutcome(
        m["name"],
        "manual",
        0.0,
        f"{src['kind']} sources have no power control: the operator confirmed the stop",
    )


def start_source(db: Database, m: dict[str, Any]) -> PowerOutcome:
    src = _source(db, m)
    t0 = time.monotonic()
    if src["kind"] == "libvirt":
        import libvirt

        dom = _libvirt_dom(db, m)
        try:
            if dom.isActive():
                if dom.state()[0] != libvirt.VIR_DOMAIN_PAUSED:
                    return PowerOutcome(m["name"], "already-on", 0.0)
                dom.destroy()  # left paused by an interrupted last delta: boot it for real
            dom.create()
        except libvirt.libvirtError as e:
            raise RunError(
                f"source '{m['name']}' could not be started: {e.get_error_message()}",
                hint="start it on the KVM host (virsh start), then roll back again",
            ) from e
        return PowerOutcome(m["name"], "power-on", time.monotonic() - t0)
    if src["kind"] == "vsphere":
        from appliance.daemon.state import adapter_for

        r = adapter_for(db, src).start_machine(m["ref"])  # type: ignore[attr-defined]
        return PowerOutcome(m["name"], str(r.action), float(r.seconds), str(r.note))
    return PowerOutcome(m["name"], "manual", 0.0, "start the source by hand")


@contextlib.contextmanager
def _paused_for_backup(db: Database, m: dict[str, Any]) -> Any:
    """A stopped libvirt source, started paused so the backup API can read its disks."""
    src = _source(db, m)
    if src["kind"] != "libvirt":
        yield
        return
    import libvirt

    dom = _libvirt_dom(db, m)
    started = False
    if not dom.isActive():
        dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
        started = True
    try:
        yield
    finally:
        if started:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()


# -- start, status, confirm --------------------------------------------------------------------


def _plan_of(db: Database, run: dict[str, Any]) -> tuple[dict[str, Any], Plan]:
    p = records.by_id(db, run["plan_id"])
    return p, check_document(p["document"], Inventory.from_db(db))


def preflight(db: Database, plan: Plan) -> list[dict[str, Any]]:
    """Every check with its verdict; blockers have ok False and a fix."""
    out: list[dict[str, Any]] = []

    def add(what: str, ok: bool, detail: str, fix: str = "") -> None:
        out.append({"check": what, "ok": ok, "detail": detail, "fix": fix})

    try:
        conn = virt.connect()
        conn.close()
        add("libvirt", True, virt.URI)
    except RunError as e:
        add("libvirt", False, e.message, e.hint or "")
    for mp in plan.machines:
        m = inventory.machine_row(db, mp.machine)
        if m["cutover_done"]:
            add(f"{mp.machine}: not cut over yet", False, "already cut over", "remove it")
            continue
        rps = inventory.restore_points(db, m["id"])
        add(
            f"{mp.machine}: restore points",
            bool(rps),
            f"{len(rps)} sealed" if rps else "none",
            f"sync it: ferryman sync {mp.machine} --wait",
        )
        src = _source(db, m)
        if src["kind"] == "libvirt":
            try:
                dom = _libvirt_dom(db, m)
                add(
                    f"{mp.machine}: source VM",
                    True,
                    f"libvirt domain {dom.name()} is {'running' if dom.isActive() else 'off'}",
                )
            except FerrymanError as e:
                add(f"{mp.machine}: source VM", False, e.message, e.hint or "")
        else:
            add(
                f"{mp.machine}: source power",
                True,
                "vSphere power control"
                if src["kind"] == "vsphere"
                else f"{src['kind']}: stopped by the operator",
            )
        busy = db.execute(
            "SELECT r.id FROM plan_runs r WHERE r.kind='cutover' AND r.state NOT IN "
            "('committed','rolled-back') AND r.report LIKE ?",
            [f'%"{mp.machine}"%'],
        ).fetchone()
        if busy:
            add(
                f"{mp.machine}: no other cutover",
                False,
                f"cutover {busy[0]} is open",
                f"finish or roll back cutover {busy[0]}",
            )
    for net in plan.networks:
        if net.mode == "bridged":
            ok = Path(f"/sys/class/net/{net.bridge}/bridge").exists()
            add(
                f"network {net.name}: bridge {net.bridge}",
                ok,
                "present" if ok else "missing",
                f"create the bridge {net.bridge} on the appliance's production NIC",
            )
    return out


def _preconverted_point(db: Database, plan: Plan, name: str) -> dict[str, Any] | None:
    """The machine's pre-converted point if it was converted as this plan converts it."""
    from appliance import preconverted
    from appliance.plans.runner import conversion_backend, customisation, machine_macs

    m = inventory.machine_row(db, name)
    cur = preconverted.current(db, m["id"])
    if cur is None:
        return None
    mp = plan.machine(name)
    rp = next(
        (r for r in inventory.restore_points(db, m["id"]) if r["id"] == cur["restore_point_id"]),
        None,
    )
    if rp is None:
        return None
    key = preconverted.custom_key(
        conversion_backend(mp, rp), customisation(mp, machine_macs(plan.name, mp, m))
    )
    pre = preconverted.usable(db, m["id"], rp["id"], key)
    return {**pre, "source_time": rp["source_time"]} if pre else None


def preconverted_checks(db: Database, plan: Plan) -> list[dict[str, Any]]:
    """--use-preconverted: every machine needs a pre-converted point made for this plan."""
    out = []
    for mp in plan.machines:
        pre = _preconverted_point(db, plan, mp.machine)
        out.append(
            {
                "check": f"{mp.machine}: pre-converted point",
                "ok": pre is not None,
                "detail": f"point {pre['restore_point_id']} (source time {pre['source_time']})"
                if pre
                else "none for this plan's conversion",
                "fix": f"ferryman verify-boot {mp.machine} --plan {plan.name} --wait, "
                "or cut over without --use-preconverted",
            }
        )
    return out


def start(
    db: Database,
    plan_name: str,
    version: int | None,
    who: str,
    mode: str = "guided",
    shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
    use_preconverted: bool = False,
) -> dict[str, Any]:
    p = records.get(db, plan_name, version)
    plan = check_document(p["document"], Inventory.from_db(db))
    checks = preflight(db, plan)
    if use_preconverted:
        checks += preconverted_checks(db, plan)
    bad = [c for c in checks if not c["ok"]]
    if bad:
        raise CutoverRefused(
            f"cutover of plan '{plan_name}' refused by preflight: {bad[0]['check']}: "
            f"{bad[0]['detail']}" + (f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""),
            hint=bad[0]["fix"] or "see the preflight list",
        )
    virt.instance_tag(db)  # names of the target's libvirt objects
    run_id = records.create_run(db, p["id"], "cutover", "awaiting", "preflight")
    rep = {
        "mode": mode,
        "shutdown_timeout_s": shutdown_timeout_s,
        "next": "final-delta",
        "machines_planned": [m.machine for m in plan.machines],
        "preflight": checks,
        "steps": [{"step": "preflight", "state": "done", "seconds": 0.0, "at": now(), "by": who}],
        "resources": {"domains": [], "networks": [], "readers": [], "overlays": [], "dir": None},
        "sources": {},
        "points": {},
        "approval": approval.initial(db, who),
        "use_preconverted": use_preconverted,
    }
    records.update_run(db, run_id, report=rep)
    return status(db, run_id)


def status(db: Database, run_id: int) -> dict[str, Any]:
    run = records.run(db, run_id)
    if run["kind"] != "cutover":
        raise CutoverRefused(f"run {run_id} is a test run", hint="use: ferryman testrun show")
    rep = run["report"] or {}
    run["next"] = rep.get("next")
    run["confirm"] = (
        f"ferryman cutover confirm {run_id} {rep['next']}"
        if rep.get("next") and run["state"] in ("awaiting", "failed", "interrupted")
        else None
    )
    return approval.annotate(run)


def confirm(
    db: Database, runner: JobRunner, run_id: int, step: str, who: str, origin: str
) -> dict[str, Any]:
    run = status(db, run_id)
    rep = run["report"]
    if run["state"] in FINAL:
        raise CutoverRefused(f"cutover {run_id} is {run['state']}", hint="start a new cutover")
    if run["state"] in ("running", "rolling-back"):
        raise CutoverRefused(
            f"cutover {run_id} is busy with step {run['step']}",
            hint=f"wait for it: ferryman cutover status {run_id}",
        )
    if step != rep.get("next"):
        raise CutoverRefused(
            f"cutover {run_id} waits for '{rep.get('next')}', not '{step}'",
            hint=f"confirm it: ferryman cutover confirm {run_id} {rep.get('next')}",
        )
    approval.check_approved(run)
    records.update_run(db, run_id, state="running", step=step)
    try:
        job = runner.submit("cutover", params={"run": run_id, "step": step}, who=who, origin=origin)
    except FerrymanError:
        records.update_run(db, run_id, state="awaiting", step=step)
        raise
    return {**status(db, run_id), "job": job}


def request_rollback(
    db: Database, runner: JobRunner, run_id: int, who: str, origin: str
) -> dict[str, Any]:
    run = status(db, run_id)
    if run["state"] == "committed":
        raise CutoverRefused(
            f"cutover {run_id} is committed: its sources are never started again",
            hint="migrate back with a new plan if you must",
        )
    if run["state"] == "rolled-back":
        raise CutoverRefused(f"cutover {run_id} is already rolled back", hint="nothing to do")
    if run["state"] in ("running", "rolling-back"):
        job = (run["report"] or {}).get("job")
        raise CutoverRefused(
            f"cutover {run_id} is busy with step {run['step']}",
            hint=f"cancel it first (ferryman job cancel {job}), then roll back",
        )
    records.update_run(db, run_id, state="rolling-back", step="rollback")
    try:
        job = runner.submit(
            "cutover", params={"run": run_id, "step": "rollback"}, who=who, origin=origin
        )
    except FerrymanError:
        records.update_run(db, run_id, state=run["state"], step=run["step"])
        raise
    return {**status(db, run_id), "job": job}


def _own_db(fn: Any, *args: Any) -> Any:
    """Run fn(db, *args) on a store connection of this thread's own."""
    db = open_store(paths().db, migrate=False)
    try:
        return fn(db, *args)
    finally:
        db.close()


# -- the job -----------------------------------------------------------------------------------


class _Cutover:
    def __init__(self, ctx: JobContext, run_id: int) -> None:
        self.ctx = ctx
        self.db = ctx.db
        self.run_id = run_id
        self.run = records.run(self.db, run_id)
        self.rep: dict[str, Any] = self.run["report"]
        self.rep["job"] = ctx.job_id  # the job of the step in progress (cancel, status)
        self.plan_row, self.plan = _plan_of(self.db, self.run)
        self.machines = {
            mp.machine: inventory.machine_row(self.db, mp.machine) for mp in self.plan.machines
        }

    def save(self, **kw: Any) -> None:
        records.update_run(self.db, self.run_id, report=self.rep, **kw)

    def step_record(self, step: str, state: str, seconds: float, detail: str = "") -> None:
        self.rep.setdefault("steps", []).append(
            {
                "step": step,
                "state": state,
                "seconds": round(seconds, 2),
                "at": now(),
                "detail": detail,
            }
        )
        self.save()

    # steps ---------------------------------------------------------------------------------

    def _delta(self, which: str) -> str:
        """One sync per machine (parallel, each on its own store connection)."""
        from appliance import replication

        self._wait_idle(which)

        def one(m: dict[str, Any]) -> dict[str, Any]:
            db = open_store(paths().db, migrate=False)
            try:
                sub = JobContext(
                    job_id=self.ctx.job_id,
                    kind="sync",
                    machine_id=m["id"],
                    params={
                        "reason": f"cutover {self.run_id} {which}",
                        "final_pass": which == "last-delta",  # the sources are stopped
                    },
                    db=db,
                    progress=Progress(),
                    cancel=self.ctx.cancel,
                )
                with (
                    _paused_for_backup(db, m) if which == "last-delta" else contextlib.nullcontext()
                ):
                    return replication.run_sync(sub)
            finally:
                db.close()

        with ThreadPoolExecutor(max_workers=max(1, len(self.machines))) as pool:
            results = dict(zip(self.machines, pool.map(one, self.machines.values()), strict=True))
        self.rep[which.replace("-", "_")] = {
            n: {k: r.get(k) for k in ("restore_point", "full", "bytes_written", "consistency")}
            for n, r in results.items()
        }
        if which == "last-delta":
            self.rep["points"] = {n: r["restore_point"] for n, r in results.items()}
        return ", ".join(
            f"{n}: point {r['restore_point']} ({r['bytes_written']} bytes)"
            for n, r in results.items()
        )

    def _pause_protection(self) -> None:
        """Continuous protection off for the machines of the cutover; rollback restores it."""
        saved = self.rep.setdefault("rpo_saved", {})
        for n, m in self.machines.items():
            saved.setdefault(n, m["rpo_seconds"])
            self.db.execute("UPDATE machines SET rpo_seconds=NULL WHERE id=?", [m["id"]])
        self.save()

    def _wait_idle(self, which: str) -> None:
        """Let a machine's running job (a scheduled sync, a verify) finish before our delta."""
        end = time.monotonic() + BUSY_WAIT_S
        while True:
            busy = [
                (m["name"], *row)
                for m in self.machines.values()
                for row in self.db.execute(
                    "SELECT id, kind FROM jobs WHERE machine_id=? AND state IN "
                    "('queued','running')",
                    [m["id"]],
                ).fetchall()
            ]
            if not busy:
                return
            name, job_id, kind = busy[0]
            if time.monotonic() >= end:
                raise RunError(
                    f"machine '{name}' still has job {job_id} ({kind}) running after "
                    f"{BUSY_WAIT_S:.0f} s",
                    hint=f"cancel it (ferryman job cancel {job_id}), then confirm {which} again",
                )
            if self.ctx.cancel.is_set():
                raise Cancelled(f"cutover {self.run_id}: cancelled while waiting for job {job_id}")
            self.ctx.progress.set_phase(
                f"cutover {self.run_id}: {which} waits for job {job_id} ({kind}) of {name}"
            )
            time.sleep(BUSY_POLL_S)

    def _stop(self) -> str:
        # Pause continuous protection first: no scheduled sync between the stop and the delta.
        self._pause_protection()
        timeout = float(self.rep.get("shutdown_timeout_s") or SHUTDOWN_TIMEOUT_S)
        self.rep["stop_started_wall"] = time.time()
        self.rep.setdefault("sources", {})
        for n in self.machines:
            self.rep["sources"][n] = {"stopping": True}
        self.save()
        with ThreadPoolExecutor(max_workers=max(1, len(self.machines))) as pool:
            outs = list(
                pool.map(lambda m: _own_db(stop_source, m, timeout), self.machines.values())
            )
        for o in outs:
            self.rep["sources"][o.machine] = {
                "action": o.action,
                "seconds": round(o.seconds, 2),
                "note": o.note,
                "stopped": True,
            }
        # Downtime starts when the last source is down (services end at the stop).
        self.rep["stopped_wall"] = self.rep["stop_started_wall"]
        return ", ".join(f"{o.machine}: {o.action} in {o.seconds:.1f}s" for o in outs)

    def _preconverted_points(self) -> str:
        """--use-preconverted: the last delta is skipped; each machine boots its
        pre-converted point, and the report keeps the RPO the operator accepted."""
        pts: dict[str, int] = {}
        accepted: dict[str, Any] = {}
        stopped = float(self.rep.get("stopped_wall") or time.time())
        for n in self.machines:
            pre = _preconverted_point(self.db, self.plan, n)
            if pre is None:
                raise RunError(
                    f"'{n}' has no pre-converted point for plan '{self.plan.name}' any more",
                    hint=f"roll back (ferryman cutover rollback {self.run_id}) and cut over "
                    "without --use-preconverted",
                )
            src = datetime.fromisoformat(pre["source_time"]).timestamp()
            pts[n] = int(pre["restore_point_id"])
            accepted[n] = {
                "restore_point": pts[n],
                "source_time": pre["source_time"],
                "rpo_s": round(stopped - src, 1),  # writes after this point are not carried
            }
        self.rep["points"] = pts
        self.rep["rpo_accepted"] = accepted
        return "skipped, pre-converted points used: " + ", ".join(
            f"{n}: point {a['restore_point']} (RPO {a['rpo_s']:.0f} s accepted)"
            for n, a in accepted.items()
        )

    def _seal(self) -> str:
        pts = self.rep.get("points") or {}
        missing = [n for n in self.machines if n not in pts]
        if missing:
            raise RunError(
                f"no last-delta restore point for {', '.join(missing)}",
                hint=f"confirm last-delta again: ferryman cutover confirm {self.run_id} last-delta",
            )
        for n, rp_id in pts.items():
            row = self.db.execute("SELECT state FROM restore_points WHERE id=?", [rp_id]).fetchone()
            if row is None or row[0] != "sealed":
                raise RunError(
                    f"restore point {rp_id} of '{n}' is not sealed any more",
                    hint="roll back and start the cutover again",
                )
        return ", ".join(f"{n}: point {p}" for n, p in pts.items())

    def _bring_up(self) -> str:
        left = self._discard_targets()  # a repeated bring-up starts clean
        if left:
            self.ctx.event(f"cutover {self.run_id}: removed a failed bring-up: {'; '.join(left)}")
        pr = PlanRun(
            self.db,
            self.run_id,
            self.plan,
            kind="cutover",
            cancel=self.ctx.cancel,
            event=lambda msg, level="info": self.ctx.event(msg, level=level, run=self.run_id),
            phase=self.ctx.progress.set_phase,
            points={n: int(p) for n, p in self.rep["points"].items()},
        )
        pr.report = self.rep  # one report: the runner adds machines, resources, totals
        pr.report.setdefault("hooks", [])
        pr.resolve()
        pr.prepare()
        pr.bring_up()
        all_ready = time.time()
        self.rep["all_ready_wall"] = all_ready
        if self.rep.get("stopped_wall"):
            self.rep["downtime_s"] = round(all_ready - float(self.rep["stopped_wall"]), 2)
        self.save()
        pr.persist()  # after the downtime clock stopped: survives a host reboot from here
        t = self.rep.get("totals") or {}
        return f"{t.get('ready')} machines ready, downtime {self.rep.get('downtime_s')} s"

    def _commit(self) -> str:
        for m in self.machines.values():
            inventory.set_protection(self.db, str(m["id"]), protected=False)
            self.db.execute("UPDATE machines SET cutover_done=1 WHERE id=?", [m["id"]])
        self.ctx.event(
            f"cutover {self.run_id} committed: {', '.join(self.machines)} run on this appliance; "
            "their sources are never started again"
        )
        return f"{len(self.machines)} machines cut over"

    def _discard_targets(self) -> list[str]:
        """Remove what a bring-up made (domains, networks, disks, reader registrations)."""
        details = []
        res = self.rep.get("resources") or {}
        conn = virt.connect()
        try:
            for d in res.get("domains", []):
                if virt.destroy_domain(conn, d):
                    details.append(f"domain {d} removed")
            for n in res.get("networks", []):
                if virt.destroy_network(conn, n):
                    details.append(f"network {n} removed")
        finally:
            conn.close()
        for o in res.get("overlays", []):
            p = Path(o)
            if p.exists():
                p.unlink()
                details.append(f"disk {p.name} removed")
        for r in res.get("readers", []):
            DiskChain(Path(r["dir"])).remove_reader(r["point"], r["id"])
        self.rep["resources"] = {
            "domains": [],
            "networks": [],
            "readers": [],
            "overlays": [],
            "dir": None,
        }
        self.save()
        return details

    def rollback(self) -> str:
        details = self._discard_targets()
        for n, src in (self.rep.get("sources") or {}).items():
            if src.get("stopped") or src.get("stopping"):
                o = start_source(self.db, self.machines[n])
                src.update({"restarted": o.action, "stopped": False, "stopping": False})
                details.append(f"source {n}: {o.action}{' (' + o.note + ')' if o.note else ''}")
        for n, rpo in (self.rep.get("rpo_saved") or {}).items():
            self.db.execute(
                "UPDATE machines SET rpo_seconds=? WHERE id=?", [rpo, self.machines[n]["id"]]
            )
        return "; ".join(details) or "nothing to undo"

    def execute(self, step: str) -> dict[str, Any]:
        if step == "rollback":
            t = time.monotonic()
            try:
                detail = self.rollback()
            except BaseException as e:
                self.step_record("rollback", "failed", time.monotonic() - t, str(e))
                records.update_run(self.db, self.run_id, state="failed", step="rollback")
                raise
            self.step_record("rollback", "done", time.monotonic() - t, detail)
            self.rep["next"] = None
            self.save(state="rolled-back", step="rollback", ended=True)
            return {"run": self.run_id, "state": "rolled-back", "detail": detail}
        todo = [step]
        if step == "stop-source" and self.rep.get("mode", "guided") == "guided":
            todo += AUTO_AFTER_STOP
        elif step in AUTO_AFTER_STOP and self.rep.get("mode", "guided") == "guided":
            todo += AUTO_AFTER_STOP[AUTO_AFTER_STOP.index(step) + 1 :]
        for s in todo:
            self.ctx.check_cancel()
            records.update_run(self.db, self.run_id, state="running", step=s)
            self.ctx.progress.set_phase(f"cutover {self.run_id}: {s}")
            t = time.monotonic()
            try:
                fn = {
                    "final-delta": lambda: self._delta("final-delta"),
                    "stop-source": self._stop,
                    "last-delta": lambda: (
                        self._preconverted_points()
                        if self.rep.get("use_preconverted")
                        else self._delta("last-delta")
                    ),
                    "seal": self._seal,
                    "bring-up": self._bring_up,
                    "commit": self._commit,
                }[s]
                detail = fn()
            except BaseException as e:
                state = "interrupted" if isinstance(e, Cancelled) else "failed"
                self.rep["next"] = s  # repeat it, or roll back
                self.rep["error"] = str(e)
                self.step_record(s, state, time.monotonic() - t, str(e))
                records.update_run(self.db, self.run_id, state=state, step=s)
                raise
            self.rep["error"] = None
            self.rep["next"] = _next_step(s)
            self.step_record(s, "done", time.monotonic() - t, detail)
            self.ctx.event(f"cutover {self.run_id}: {s} done: {detail}")
        final = "committed" if todo[-1] == "commit" else "awaiting"
        self.save(state=final, step=todo[-1], ended=final == "committed")
        return {"run": self.run_id, "state": final, "next": self.rep.get("next")}


def run_cutover_job(ctx: JobContext) -> dict[str, Any]:
    run_id = int(ctx.params["run"])
    try:
        return _Cutover(ctx, run_id).execute(str(ctx.params["step"]))
    finally:
        # Committed, rolled back, failed or interrupted: the signed evidence pack of the run.
        evidence.after_cutover_job(ctx.db, run_id, ctx.job_id, event=ctx.event)
