"""Bring a plan's machines up: overlays, conversion, domains, boot by rank, readiness, RTO.

One engine for both kinds of run:

    test run   overlays under the run's directory, isolated copies of every plan network,
               transient domains; everything is removed at the end, whatever happened
    cutover    disks under the production directory, bridged networks as the plan says,
               persistent autostart domains that stay

The pipeline never waits for a whole phase when it does not have to: every conversion is
queued at once (rank order, bounded by cores and memory), and a machine boots as soon as its
own conversion is done, its rank's turn has come (every machine of the lower ranks is ready
and their hooks ran) and the machines it depends on are ready. Time lost between steps is what
``plan_rto_overhead`` measures.

Phases per machine, in seconds, all on one monotonic clock started when the run starts:

    convert  its conversion (or overlay creation when conversion is "none")
    wait     converted, waiting for its rank, its dependencies, a hook
    boot     domain start -> the first readiness check passes (the guest is up)
    ready    the first check -> every check passed
    rto      run start -> ready

Every libvirt object and overlay is recorded in the run's report BEFORE it is created, so a
daemon killed at any moment leaves a list that ``recover_interrupted`` can clean.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from appliance import inventory, preconverted
from appliance.config import paths
from appliance.convert import api as convert_api
from appliance.datapath.chain import DiskChain
from appliance.errors import Cancelled, FerrymanError
from appliance.plans import records, virt
from appliance.plans import report as report_mod
from appliance.plans.errors import ReadinessFailed, RunError
from appliance.plans.model import (
    DEFAULT_CONSOLE_PATTERN,
    DEFAULT_TIMEOUT_S,
    Check,
    MachinePlan,
    Plan,
    generated_mac,
)
from appliance.plans.readiness import CheckResult, run_check
from appliance.replication import point_name
from store.db import now

log = logging.getLogger(__name__)

DEFAULT_MEMORY_MIB = 1024
DEFAULT_CPUS = 1
HOOK_OUTPUT_CHARS = 2000  # kept in the report per hook


def runs_dir() -> Path:
    return paths().volume_dir / "plan-runs"


def run_dir(run_id: int) -> Path:
    return runs_dir() / f"run-{run_id}"


def export_dir(run_id: int) -> Path:
    """Where reports and console logs stay after clean-up removed the run's volumes."""
    return paths().log_dir / "plan-runs" / f"run-{run_id}"


@dataclass
class MachineRun:
    plan: MachinePlan
    row: dict[str, Any]  # machines row
    rp: dict[str, Any]  # restore point (inventory.restore_points)
    domain: str
    console: Path
    disks: list[Path] = field(default_factory=list)
    macs: list[str] = field(default_factory=list)
    t: dict[str, float] = field(default_factory=dict)  # event -> seconds since run start
    checks: list[CheckResult] = field(default_factory=list)
    conversion: dict[str, Any] | None = None
    state: str = "pending"
    error: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    xml: str = ""

    def phases(self) -> dict[str, float | None]:
        t = self.t

        def span(a: str, b: str) -> float | None:
            return round(t[b] - t[a], 2) if a in t and b in t else None

        return {
            "convert_s": span("convert_start", "convert_end"),
            "wait_s": span("convert_end", "boot_start"),
            "boot_s": span("boot_start", "first_ok"),
            "ready_s": span("first_ok", "ready"),
        }


def _resolve_point(db: Database, m: dict[str, Any], policy: str | int) -> dict[str, Any]:
    rps = inventory.restore_points(db, m["id"])
    if isinstance(policy, int):
        rp = next((r for r in rps if r["id"] == policy), None)
        if rp is None:
            raise RunError(
                f"machine '{m['name']}' has no restore point {policy} (merged or deleted?)",
                hint=f"pick one from: ferryman points {m['name']}, or use 'latest'",
            )
        return rp
    if policy == "latest-verified":
        # Boot-verified: converted and booted with no network, its checks passed
        # (appliance/bootverify.py), and never failed a hash verification.
        rps = [
            r
            for r in rps
            if r.get("boot_verified") == "bootable" and r.get("verified") != "mismatch"
        ]
    if not rps:
        what = "boot-verified restore point" if policy == "latest-verified" else "restore point"
        raise RunError(
            f"machine '{m['name']}' has no {what}",
            hint=f"verify its newest point: ferryman verify-boot {m['name']} --wait"
            if policy == "latest-verified"
            else f"sync it first: ferryman sync {m['name']} --wait",
        )
    return rps[-1]


def machine_macs(plan_name: str, mp: MachinePlan, row: dict[str, Any]) -> list[str]:
    """The MAC of each NIC of the plan's machine: the source's, a generated one, or given."""
    src = [n.get("mac", "") for n in row.get("nics") or []]
    out = []
    for i, nic in enumerate(mp.nics):
        if nic.mac == "keep" and i < len(src) and src[i]:
            out.append(src[i].lower())
        elif nic.mac in ("keep", "new"):
            out.append(generated_mac(plan_name, mp.machine, i))
        else:
            out.append(nic.mac.lower())
    return out


def customisation(mp: MachinePlan, macs: list[str]) -> dict[str, Any] | None:
    """What the conversion writes into the guest for this plan (host name, addresses)."""
    ifs = []
    for i, nic in enumerate(mp.nics):
        if nic.address is None:
            continue
        entry: dict[str, Any] = {"name": f"eth{i}", "mac": macs[i], "ipv4": [nic.address]}
        if nic.gateway:
            entry["gateway4"] = nic.gateway
        if nic.dns:
            entry["dns"] = nic.dns
        ifs.append(entry)
    out: dict[str, Any] = {}
    if mp.hostname:
        out["hostname"] = mp.hostname
    if ifs:
        out["interfaces"] = ifs
    return out or None


def conversion_backend(mp: MachinePlan, rp: dict[str, Any]) -> str:
    """builtin | virt-v2v | none: the plan's choice, "auto" decided by the stored inspection."""
    if mp.conversion != "auto":
        return mp.conversion
    insp = rp.get("inspection") or {}
    return "virt-v2v" if insp.get("os_type") == "windows" else "builtin"


def domain_spec(
    db: Database,
    mp: MachinePlan,
    row: dict[str, Any],
    *,
    name: str,
    title: str,
    disks: list[Path],
    console: Path,
    nics: list[virt.NicSpec],
    cache: str,
    metadata: dict[str, str],
) -> virt.DomainSpec:
    """The domain of a plan's machine: the plan's sizes, else the source's."""
    return virt.DomainSpec(
        name=name,
        title=title,
        memory_mib=mp.memory_mib or row.get("memory_mib") or DEFAULT_MEMORY_MIB,
        cpus=mp.cpus or row.get("cpus") or DEFAULT_CPUS,
        disks=disks,
        console_log=console,
        domain_type=virt.domain_type(db),
        disk_bus=mp.disk_bus,
        firmware=mp.firmware or ("uefi" if row.get("firmware") == "efi" else "bios"),
        nics=nics,
        cache=cache,
        metadata=metadata,
    )


def machine_checks(mp: MachinePlan) -> list[Check]:
    if mp.checks:
        return mp.checks
    return [
        Check(
            type="console",
            timeout_s=DEFAULT_TIMEOUT_S["console"],
            pattern=DEFAULT_CONSOLE_PATTERN,
        )
    ]


class PlanRun:
    """One execution of a plan; ``kind`` is "test" or "cutover"."""

    def __init__(
        self,
        db: Database,
        run_id: int,
        plan: Plan,
        *,
        kind: str,
        cancel: threading.Event,
        event: Callable[..., None] | None = None,
        phase: Callable[[str], None] | None = None,
        points: dict[str, int] | None = None,  # cutover: machine -> sealed restore point id
        clock: Callable[[], float] = time.monotonic,
        use_preconverted: bool = True,  # boot a pre-converted point instead of converting
    ) -> None:
        self.db = db
        self.run_id = run_id
        self.plan = plan
        self.kind = kind
        self.cancel = cancel
        self._event = event
        self._phase = phase
        self.points = points or {}
        self.clock = clock
        self.use_preconverted = use_preconverted
        self.abort = threading.Event()  # stop everything: job cancelled or a machine failed
        self._stop_watch = threading.Event()
        self._dblock = threading.RLock()
        self.inst = virt.instance_tag(db)
        self.prefix = virt.prefix(self.inst, kind, run_id)
        self.dir = run_dir(run_id) if kind == "test" else paths().volume_dir / "production"
        self.machines: dict[str, MachineRun] = {}
        self.t0 = 0.0
        self.report: dict[str, Any] = records.run(db, run_id)["report"] or {}
        self.report.setdefault("resources", {"domains": [], "networks": [], "readers": []})
        self.report["resources"].setdefault("dir", str(self.dir) if kind == "test" else None)
        self.report["resources"].setdefault("overlays", [])
        self.report.setdefault("hooks", [])
        self._net_names: dict[str, str] = {}

    # -- bookkeeping ---------------------------------------------------------------------

    def event(self, message: str, level: str = "info") -> None:
        log.info("run %s: %s", self.run_id, message)
        if self._event is not None:
            with self._dblock:
                self._event(message, level)

    def phase(self, text: str) -> None:
        if self._phase is not None:
            self._phase(text)

    def save(self, **kw: Any) -> None:
        with self._dblock:
            records.update_run(self.db, self.run_id, report=self.report, **kw)

    def _record(self, kind: str, value: Any) -> None:
        with self._dblock:
            self.report["resources"][kind].append(value)
            records.update_run(self.db, self.run_id, report=self.report)

    def since(self) -> float:
        return round(self.clock() - self.t0, 2)

    def check_cancel(self) -> None:
        if self.cancel.is_set():
            self.abort.set()
            raise Cancelled(f"plan run {self.run_id} was cancelled")

    # -- steps ---------------------------------------------------------------------------

    def resolve(self) -> None:
        """Restore point per machine (the plan's policy, or the cutover's sealed point)."""
        self.t0 = self.clock()  # the RTO counts from here: preparation included
        for mp in self.plan.machines:
            m = inventory.machine_row(self.db, mp.machine)
            if self.kind == "test" and m["cutover_done"]:
                raise RunError(
                    f"machine '{m['name']}' was cut over; its restore points are history",
                    hint="remove it from the plan",
                )
            policy: str | int = self.points.get(mp.machine, mp.restore_point)
            rp = _resolve_point(self.db, m, policy)
            name = f"{self.prefix}{mp.machine}"
            self.machines[mp.machine] = MachineRun(
                plan=mp,
                row=m,
                rp=rp,
                domain=name,
                console=(self.dir / f"{mp.machine}.console.log")
                if self.kind == "test"
                else self.dir / mp.machine / "console.log",
            )
        self.report["machines"] = {
            n: {
                "machine": n,
                "rank": mr.plan.rank,
                "restore_point": {
                    "id": mr.rp["id"],
                    "source_time": mr.rp["source_time"],
                    "verified": mr.rp.get("verified"),
                    "consistency": mr.rp.get("consistency"),
                },
                "domain": mr.domain,
                "state": "pending",
            }
            for n, mr in self.machines.items()
        }
        self.save()

    def prepare(self) -> None:
        """Run directory, reader registrations on the restore points, networks."""
        self.dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for mr in self.machines.values():
            if self.kind == "cutover":
                (self.dir / mr.plan.machine).mkdir(parents=True, exist_ok=True)
            for d in mr.rp["disks"]:
                chain = DiskChain(Path(d["path"]).parent)
                point = point_name(int(mr.rp["session_id"]))
                holder = f"{'test run' if self.kind == 'test' else 'cutover'} {self.run_id}"
                rid = chain.add_reader(point, holder)
                self._record("readers", {"dir": str(chain.dir), "point": point, "id": rid})
        conn = virt.connect()
        try:
            used = {n.network for mp in self.plan.machines for n in mp.nics}
            for i, net in enumerate(self.plan.networks):
                if net.name not in used:
                    continue
                if self.kind == "cutover" and net.mode == "bridged":
                    continue  # production bridge of the appliance: nothing to create
                name = f"{self.prefix}{net.name}"
                self._net_names[net.name] = name
                self._record("networks", name)
                virt.create_network(
                    conn,
                    virt.network_xml(
                        name,
                        virt.bridge_name(self.inst, self.kind, self.run_id, i),
                        net.subnet,
                        net.gateway,
                        net.dhcp,
                    ),
                    persistent=self.kind == "cutover",
                )
                self.event(f"network {name} up ({net.subnet or 'no subnet'}, isolated)")
        finally:
            conn.close()

    def _customisation(self, mr: MachineRun) -> dict[str, Any] | None:
        return customisation(mr.plan, mr.macs)

    def _macs(self, mr: MachineRun) -> list[str]:
        return machine_macs(self.plan.name, mr.plan, mr.row)

    def convert(self, mr: MachineRun) -> None:
        """Overlays over the restore point's disks; the boot disk converted in place."""
        mr.t["convert_start"] = self.since()
        mr.state = "converting"
        disks = sorted(mr.rp["disks"], key=lambda d: d["disk_key"])
        base = self.dir if self.kind == "test" else self.dir / mr.plan.machine
        tag = f"run{self.run_id}-" if self.kind == "cutover" else ""
        targets = [base / f"{mr.plan.machine}-{tag}{d['disk_key']}.qcow2" for d in disks]
        for t in targets:
            self._record("overlays", str(t))
        conversion = conversion_backend(mr.plan, mr.rp)
        if self._from_preconverted(mr, conversion, disks, targets):
            return
        for i, (d, target) in enumerate(zip(disks, targets, strict=True)):
            if self.abort.is_set():
                raise Cancelled(f"conversion of {mr.plan.machine} stopped")
            if i == 0 and conversion != "none":
                self.event(
                    f"converting {mr.plan.machine} ({conversion}) from restore point {mr.rp['id']}"
                )
                try:
                    res = convert_api.convert(
                        Path(d["path"]),
                        target,
                        backend=conversion,  # type: ignore[arg-type]
                        plan=self._customisation(mr),
                        cancel=self.abort,
                        log_dir=base,
                    )
                except FerrymanError as e:
                    raise RunError(
                        f"conversion of '{mr.plan.machine}' (restore point {mr.rp['id']}) "
                        f"failed: {e.message}",
                        hint=e.hint or "run the conversion preflight: ferryman convert check",
                    ) from e
                mr.conversion = {
                    "backend": res.backend,
                    "seconds": res.seconds,
                    "steps": res.steps,
                    "changes": len(res.changes),
                    "verify_ok": bool(res.verify.get("ok", True)),
                }
            else:
                convert_api.create_overlay(Path(d["path"]), target)
        self._converted(mr, targets)
        self.event(
            f"{mr.plan.machine} converted in {mr.t['convert_end'] - mr.t['convert_start']:.1f} s"
        )

    def _converted(self, mr: MachineRun, disks: list[Path]) -> None:
        mr.disks = disks
        mr.t["convert_end"] = self.since()
        mr.state = "converted"
        self._publish()

    def _from_preconverted(
        self, mr: MachineRun, conversion: str, disks: list[dict[str, Any]], targets: list[Path]
    ) -> bool:
        """Thin overlays over the machine's pre-converted point when it is this point,
        converted as this plan converts it: no conversion, the RTO is the boot."""
        if not self.use_preconverted or conversion == "none":
            return False
        key = preconverted.custom_key(conversion, self._customisation(mr))
        pre = preconverted.usable(self.db, mr.row["id"], mr.rp["id"], key)
        if pre is None:
            return False
        by_key = {d["disk_key"]: d for d in pre["disks"]}
        try:
            for d, target in zip(disks, targets, strict=True):
                convert_api.create_overlay(Path(by_key[d["disk_key"]]["path"]), target)
        except (FerrymanError, KeyError) as e:  # retired under us: convert after all
            for t in targets:
                t.unlink(missing_ok=True)
            self.event(f"{mr.plan.machine}: pre-converted point unusable ({e}); converting")
            return False
        mr.conversion = {
            "backend": "preconverted",
            "seconds": 0.0,
            "steps": {},
            "changes": 0,
            "verify_ok": True,
            "preconverted": {
                "restore_point": pre["restore_point_id"],
                "backend": pre["backend"],
                "converted_at": pre["created_at"],
                "convert_s": pre["convert_seconds"],
            },
        }
        self._converted(mr, targets)
        self.event(
            f"{mr.plan.machine}: pre-converted restore point {mr.rp['id']} used, no conversion "
            f"(it took {pre['convert_seconds']} s when it was verified)"
        )
        return True

    def _domain_xml(self, mr: MachineRun) -> str:
        nics = []
        for mac, nic in zip(mr.macs, mr.plan.nics, strict=True):
            net = self.plan.network(nic.network)
            if self.kind == "cutover" and net.mode == "bridged":
                nics.append(virt.NicSpec(mac=mac, bridge=net.bridge))
            else:
                nics.append(virt.NicSpec(mac=mac, network=self._net_names[nic.network]))
        return virt.domain_xml(
            domain_spec(
                self.db,
                mr.plan,
                mr.row,
                name=mr.domain,
                title=f"ferryman {self.kind} run {self.run_id} of plan {self.plan.name}: "
                f"{mr.plan.machine}",
                disks=mr.disks,
                console=mr.console,
                nics=nics,
                cache="unsafe" if self.kind == "test" else "none",
                metadata={
                    "run": str(self.run_id),
                    "kind": self.kind,
                    "plan": self.plan.name,
                    "machine": mr.plan.machine,
                },
            )
        )

    def prestart(self, mr: MachineRun, conv: Future[None]) -> None:
        """Once converted, start the domain PAUSED: libvirt's start-up (tens of seconds where
        it re-probes qemu) overlaps the wait for the machine's turn instead of adding to it."""
        conv.result()
        if self.abort.is_set():
            raise Cancelled(f"{mr.plan.machine}: run stopped before its domain started")
        conn = virt.connect()
        try:
            self._record("domains", mr.domain)
            mr.console.parent.mkdir(parents=True, exist_ok=True)
            mr.xml = self._domain_xml(mr)
            # Transient even for a cutover: made persistent after readiness (persist()).
            virt.start_domain(conn, mr.xml, paused=True)
        finally:
            conn.close()

    def boot(self, mr: MachineRun, pre: Future[None]) -> None:
        """Wait for the dependencies and the paused domain, resume it, run the checks."""
        try:
            for dep in mr.plan.depends_on:
                d = self.machines[dep]
                while not d.ready.wait(0.2):
                    if self.abort.is_set():
                        raise Cancelled(f"{mr.plan.machine}: run stopped while waiting")
                if d.state != "ready":
                    raise RunError(
                        f"'{mr.plan.machine}' depends on '{dep}', which did not come up",
                        hint=f"fix '{dep}' first",
                    )
            if self.abort.is_set():
                raise Cancelled(f"{mr.plan.machine}: run stopped before boot")
            turn = self.since()
            pre.result()  # conversion and paused start
            mr.state = "booting"
            # Its turn came while it was still converting: the boot starts with the domain.
            mr.t["boot_start"] = max(turn, mr.t.get("convert_end", turn))
            conn = virt.connect()
            try:
                virt.resume_domain(conn, mr.domain)
                self.event(f"{mr.plan.machine} started as domain {mr.domain}")
                self._publish()  # the stored report follows the machines live
                for check in machine_checks(mr.plan):
                    r = run_check(
                        check,
                        conn=conn,
                        domain=mr.domain,
                        console=mr.console,
                        cancel=self.abort,
                        clock=self.clock,
                    )
                    mr.checks.append(r)
                    if not r.passed:
                        if r.detail == "cancelled":
                            raise Cancelled(f"{mr.plan.machine}: run stopped during checks")
                        raise ReadinessFailed(mr.plan.machine, r.check, r.detail)
                    mr.t.setdefault("first_ok", self.since())
            finally:
                conn.close()
            mr.t["ready"] = self.since()
            mr.state = "ready"
            self._publish()
            self.event(f"{mr.plan.machine} ready after {mr.t['ready']:.1f} s")
        except BaseException as e:
            if mr.state not in ("ready",):
                mr.state = "cancelled" if isinstance(e, Cancelled) else "failed"
                mr.error = str(e)
            raise
        finally:
            mr.ready.set()

    def hook(self, when: str, rank: int) -> None:
        for h in self.plan.hooks_for(when, rank, self.kind):
            self.check_cancel()
            t = self.clock()
            env = {
                **os.environ,
                "FERRYMAN_PLAN": self.plan.name,
                "FERRYMAN_RUN": str(self.run_id),
                "FERRYMAN_RUN_KIND": self.kind,
                "FERRYMAN_RANK": str(rank),
                "FERRYMAN_MACHINES": " ".join(m.machine for m in self.plan.in_rank(rank)),
            }
            self.phase(f"hook {when} rank {rank}: {h.command}")
            try:
                p = subprocess.run(
                    ["/bin/sh", "-c", h.command],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=h.timeout_s,
                    check=False,
                )
                rc, out = p.returncode, (p.stdout + p.stderr)[-HOOK_OUTPUT_CHARS:]
            except subprocess.TimeoutExpired:
                rc, out = -1, f"timed out after {h.timeout_s} s"
            entry = {
                "when": when,
                "rank": rank,
                "command": h.command,
                "exit": rc,
                "seconds": round(self.clock() - t, 2),
                "output": out,
            }
            with self._dblock:
                self.report["hooks"].append(entry)
            self.save()
            if rc != 0:
                raise RunError(
                    f"hook {when} rank {rank} ({h.command!r}) failed with exit {rc}: "
                    f"{out.strip().splitlines()[-1] if out.strip() else 'no output'}",
                    hint="fix the hook or the service it checks; its output is in the report",
                )

    def bring_up(self) -> None:
        """Conversions in parallel, then boot rank by rank; raises on the first failure."""
        if not self.t0:
            self.t0 = self.clock()
        self.report["t0"] = now()
        for mr in self.machines.values():
            mr.macs = self._macs(mr)
        ordered = sorted(self.machines.values(), key=lambda m: m.plan.rank)
        limit = max(1, min(convert_api.parallel_limit(), len(ordered)))
        watcher = threading.Thread(target=self._watch_cancel, daemon=True)
        watcher.start()
        pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix=f"run{self.run_id}-conv")
        boots = ThreadPoolExecutor(
            max_workers=max(1, len(ordered)), thread_name_prefix=f"run{self.run_id}-boot"
        )
        starts = ThreadPoolExecutor(
            max_workers=max(1, len(ordered)), thread_name_prefix=f"run{self.run_id}-start"
        )
        try:
            conv = {mr.plan.machine: pool.submit(self.convert, mr) for mr in ordered}
            pre = {
                mr.plan.machine: starts.submit(self.prestart, mr, conv[mr.plan.machine])
                for mr in ordered
            }
            self.phase(f"converting {len(ordered)} machines ({limit} at a time)")
            for rank in self.plan.ranks():
                self.check_cancel()
                self.hook("before", rank)
                members = [self.machines[m.machine] for m in self.plan.in_rank(rank)]
                self.phase(f"rank {rank}: " + ", ".join(m.plan.machine for m in members))
                futs = [boots.submit(self.boot, mr, pre[mr.plan.machine]) for mr in members]
                errors: list[BaseException] = []
                for f in futs:
                    try:
                        f.result()
                    except BaseException as e:
                        errors.append(e)
                        self.abort.set()  # the others of the rank stop waiting
                self._publish()
                if errors:
                    self.check_cancel()
                    # The machine that failed, not the ones stopped because of it.
                    real = [e for e in errors if not isinstance(e, Cancelled)]
                    raise (real or errors)[0]
                self.hook("after", rank)
        except BaseException:
            self.abort.set()
            raise
        finally:
            self._stop_watch.set()
            pool.shutdown(wait=True, cancel_futures=True)
            starts.shutdown(wait=True, cancel_futures=True)
            boots.shutdown(wait=True, cancel_futures=True)
            self._publish()

    def persist(self) -> list[str]:
        """Cutover targets: persistent and autostart, once every machine is ready."""
        conn = virt.connect()
        try:
            for mr in self.machines.values():
                virt.persist_domain(conn, mr.xml)
        finally:
            conn.close()
        return [mr.domain for mr in self.machines.values()]

    def _watch_cancel(self) -> None:
        while not self._stop_watch.is_set():
            if self.cancel.wait(0.2):
                self.abort.set()
                return

    def _publish(self) -> None:
        """Machine states, phases and checks into the stored report."""
        with self._dblock:
            for name, mr in self.machines.items():
                self.report["machines"][name].update(
                    {
                        "state": mr.state,
                        "error": mr.error,
                        "phases": mr.phases(),
                        "rto_s": mr.t.get("ready"),
                        "checks": [c.to_dict() for c in mr.checks],
                        "conversion": mr.conversion,
                        "console_log": str(mr.console),
                        "macs": mr.macs,
                    }
                )
            self.report["totals"] = report_mod.totals(self.report, self.plan)
        self.save()


# -- clean-up ----------------------------------------------------------------------------------


def cleanup(
    db: Database, run_id: int, report: dict[str, Any], *, export: bool = True
) -> dict[str, Any]:
    """Remove every domain, network, overlay and reader a test run recorded, then look for
    anything else carrying the run's name prefix. Idempotent; returns what it did."""
    t0 = time.monotonic()
    res = report.get("resources") or {}
    done: dict[str, Any] = {"domains": [], "networks": [], "overlays": 0, "readers": 0}
    problems: list[str] = []
    inst = virt.instance_tag(db)
    pfx = virt.prefix(inst, "test", run_id)
    rdir = Path(res["dir"]) if res.get("dir") else run_dir(run_id)
    if export:
        with contextlib.suppress(OSError):
            out = export_dir(run_id)
            out.mkdir(parents=True, exist_ok=True)
            for f in rdir.glob("*.console.log") if rdir.exists() else []:
                shutil.copy2(f, out / f.name)
    try:
        conn = virt.connect()
    except RunError as e:
        problems.append(str(e))
        conn = None
    if conn is not None:
        try:
            for name in res.get("domains", []):
                if virt.destroy_domain(conn, name):
                    done["domains"].append(name)
            for name in res.get("networks", []):
                if virt.destroy_network(conn, name):
                    done["networks"].append(name)
            # Anything named for this run that the report missed (a crash mid-create).
            extra = virt.leftovers(conn, pfx)
            for name in extra["domains"]:
                virt.destroy_domain(conn, name)
                done["domains"].append(name)
            for name in extra["networks"]:
                virt.destroy_network(conn, name)
                done["networks"].append(name)
            left = virt.leftovers(conn, pfx)
            if left["domains"] or left["networks"]:
                problems.append(f"still present: {left}")
        finally:
            conn.close()
    for r in res.get("readers", []):
        try:
            DiskChain(Path(r["dir"])).remove_reader(r["point"], r["id"])
            done["readers"] += 1
        except OSError as e:
            problems.append(f"reader {r['id']} on {r['point']}: {e}")
    for o in res.get("overlays", []):
        p = Path(o)
        if p.exists():
            p.unlink()
            done["overlays"] += 1
    if rdir.exists() and rdir.is_relative_to(runs_dir()):
        shutil.rmtree(rdir, ignore_errors=True)
        if rdir.exists():
            problems.append(f"directory {rdir} could not be removed")
    done["ok"] = not problems
    done["problems"] = problems
    done["seconds"] = round(time.monotonic() - t0, 2)
    return done
