"""One machine: disks, the restore point chain, sync history, inspection and preflight, and
the actions sync now / full sync / verify / protection settings."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import DataTable, ProgressBar, Static

from appliance.errors import FerrymanError
from appliance.inventory import rpo_status
from tui import format as fmt
from tui.messages import ActionDone, JobProgressed, JobSubmitted
from tui.screens.base import FerrymanScreen
from tui.screens.protect import ProtectDialog

PREVIEW_POLL_S = 1.0  # inspection and conversion take minutes: a look per second is plenty


def rp_row(rp: dict[str, Any], now: Any, newest: bool) -> tuple[str, ...]:
    size = sum(d.get("size", 0) for d in rp.get("disks", []))
    verified = {"ok": "✓ verified", "mismatch": "✗ MISMATCH"}.get(
        rp.get("verified") or "", "· not yet"
    )
    boot = {"bootable": " ✓boot", "not-bootable": " ✗NO BOOT"}.get(
        rp.get("boot_verified") or "", ""
    )
    return (
        f"{'▸' if newest else ' '}{rp['id']}",
        fmt.clock(rp["source_time"], now),
        fmt.duration(fmt.age_s(rp["source_time"], now)),
        "full" if rp.get("full") else "incr",
        fmt.size(rp.get("bytes_written")) + " / " + fmt.size(size),
        rp.get("consistency", "?"),
        verified + boot,
    )


def _finding(f: Any) -> str:
    """A preflight finding: {code, message, fix} as stored, or plain text."""
    if isinstance(f, dict):
        return f"{f.get('message', '')}" + (f" → {f['fix']}" if f.get("fix") else "")
    return str(f)


def inspection_text(data: dict[str, Any] | None) -> Text:
    """Inspection and preflight as the inspect job stores them with the restore point
    ({"inspection": ..., "preflight": ...}; appliance.conversion_jobs)."""
    t = Text()
    if not data:
        t.append(
            "No inspection stored yet: press c (convert preview) to inspect the highlighted "
            "restore point and try its conversion.",
            style="dim",
        )
        return t
    ins = data.get("inspection") or {}
    distro, product = ins.get("distro") or "", ins.get("product_name") or ""
    guest = product if distro.lower() in product.lower() else f"{distro} {product}".strip()
    kernels = ins.get("kernels") or []
    default = next((k for k in kernels if k.get("default")), kernels[0] if kernels else {})
    rows = (
        ("guest", f"{guest or '?'} ({ins.get('os_type', '?')}, {ins.get('arch', '?')})"),
        ("firmware", f"{ins.get('firmware') or '?'}, boot {ins.get('bootloader') or '?'}"),
        ("kernel", default.get("version", "")),
        ("tools", ", ".join(ins.get("hypervisor_tools") or [])),
    )
    for k, v in rows:
        if v:
            t.append(f"{k:<10} ", style="bold")
            t.append(f"{v}\n")
    pre = data.get("preflight") or {}
    if pre:
        ok = bool(pre.get("ok"))
        t.append("preflight  ", style="bold")
        t.append(
            f"{'✓ READY' if ok else '✗ BLOCKED'} (backend {pre.get('backend', '?')})\n",
            style="bold",
        )
        for b in pre.get("blockers") or []:
            t.append(f"  ✗ {_finding(b)}\n")
        for w in pre.get("warnings") or []:
            t.append(f"  ! {_finding(w)}\n")
    return t


def preview_text(rp_id: int, step: str, data: dict[str, Any]) -> Text:
    """Where the convert preview of a restore point stands, and what it found."""
    t = Text()
    t.append(f"convert preview of point {rp_id}: ", style="bold")
    if step == "inspecting":
        t.append("… inspecting (libguestfs; minutes under TCG)\n")
    elif step == "converting":
        t.append("▶ converting onto a throw-away overlay\n")
    elif step == "blocked":
        t.append("✗ not converted: preflight blocks it (above)\n", style="bold")
    elif step == "failed":
        t.append(f"✗ FAILED: {data.get('error', '?')}\n", style="bold")
    elif step == "converted":
        v = data.get("verify") or {}
        t.append(
            f"✓ converts with {data.get('backend')} in {data.get('seconds', 0):.0f} s",
            style="bold",
        )
        t.append(f"{'' if v.get('ok', True) else '; ! check after conversion failed'}\n")
        steps = data.get("steps") or {}
        if steps:
            t.append("  " + ", ".join(f"{k} {v:.0f}s" for k, v in steps.items()) + "\n")
        for c in (data.get("changes") or [])[:6]:
            t.append(f"  · {c}\n")
        t.append("  (the overlay was deleted; the restore point is unchanged)\n", style="dim")
    return t


def job_note(result: Any) -> str:
    """What a finished job left, in a few words: the restore point, what it wrote."""
    if not isinstance(result, dict):
        return str(result or "")[:80]
    parts = []
    rp = result.get("restore_point") or result.get("restore_point_id")
    if rp:
        parts.append(f"rp {rp}")
    if "full" in result:
        parts.append("full" if result["full"] else "incremental")
    for key, label in (("bytes_written", "wrote"), ("bytes_read", "read")):
        if result.get(key) is not None:
            parts.append(f"{label} {fmt.size(result[key])}")
            break
    if result.get("reason"):
        parts.append(str(result["reason"]))
    if result.get("verified") or result.get("result"):
        parts.append(str(result.get("verified") or result.get("result")))
    return ", ".join(parts) or ", ".join(f"{k}={v}" for k, v in list(result.items())[:2])[:80]


class MachineScreen(FerrymanScreen):
    NAV = "dashboard"
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        # Short labels: all seven fit the footer of an 80-column console.
        Binding("s", "sync(False)", "Sync"),
        Binding("f", "sync(True)", "Full"),
        Binding("v", "verify", "Verify"),
        Binding("p", "protect", "RPO"),  # protection: RPO target, throttle, verify
        Binding("u", "unprotect", "Unprotect"),
        Binding("c", "convert_preview", "Preview"),
    ]

    @dataclass
    class Loaded(Message):
        machine: dict[str, Any]

    @dataclass
    class Previewed(Message):
        """The convert preview moved on: inspecting, blocked, converting, converted, failed."""

        rp_id: int
        step: str
        data: dict[str, Any]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.machine_name = name
        self.machine: dict[str, Any] | None = None
        self.preview: MachineScreen.Previewed | None = None
        self.inspected: dict[int, dict[str, Any]] = {}  # fresher than the last load

    def compose_body(self) -> ComposeResult:
        yield Static(f"machine {self.machine_name}: loading…", id="m-head")
        with Horizontal(id="m-progress-row"):
            yield Static("", id="m-job")
            yield ProgressBar(total=100, show_eta=False, id="m-bar")
        with Horizontal(id="m-top"):
            with Vertical(id="m-disks-pane"):
                yield Static("DISKS", classes="pane-title")
                yield DataTable(id="m-disks", cursor_type="row")
            with VerticalScroll(id="m-inspect-pane"):
                yield Static("INSPECTION / PREFLIGHT", classes="pane-title")
                yield Static("", id="m-inspect")
        yield Static("RESTORE POINTS (newest ▸)", classes="pane-title")
        yield DataTable(id="m-rps", cursor_type="row")
        yield Static("SYNC HISTORY", classes="pane-title")
        yield DataTable(id="m-jobs", cursor_type="row")

    def on_mount(self) -> None:
        # Fixed widths: auto widths depend on when rows arrive relative to the first layout.
        for table, cols in (
            ("#m-disks", (("DISK", 6), ("SIZE", 9), ("LABEL", 40))),
            (
                "#m-rps",
                (
                    ("RP", 5),
                    ("TAKEN", 11),
                    ("AGE", 6),
                    ("TYPE", 4),
                    ("WRITTEN/SIZE", 20),
                    ("CONSISTENCY", 18),
                    ("VERIFIED", 20),
                ),
            ),
            ("#m-jobs", (("JOB", 5), ("KIND", 7), ("STATE", 14), ("ENDED", 11), ("NOTE", 80))),
        ):
            t = self.query_one(table, DataTable)
            for label, width in cols:
                t.add_column(label, width=width)
        self.query_one("#m-progress-row").display = False
        self.query_one("#m-rps").focus()
        super().on_mount()

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="load", name="Loading the machine"
    )
    def load(self) -> None:
        c = self.services.client
        m = c.machine(self.machine_name)
        self.post_message(self.Loaded(m))
        active = [j for j in m.get("jobs", []) if j["state"] in ("queued", "running")]
        if active:
            self.post_message(JobProgressed(c.job(active[0]["id"])))

    def on_machine_screen_loaded(self, msg: Loaded) -> None:
        m = self.machine = msg.machine
        now = self.services.now()
        points = m.get("restore_points", [])
        age = fmt.age_s(points[-1]["source_time"], now) if points else None
        status = rpo_status(age, m.get("rpo_seconds")) if m["protected"] else "none"
        rpo = fmt.rpo_words(status, age, m.get("rpo_seconds"))
        throttle = fmt.rate(m["throttle_bps"]) if m.get("throttle_bps") else "none"
        head = Text(no_wrap=False)
        head.append(f"{m['name']}", style="bold")
        head.append(
            f"  on {m['source']}  {m.get('guest_os') or '-'}  {m.get('cpus')} vCPU  "
            f"{m.get('memory_mib')} MiB  power {m.get('power_state')}\n"
        )
        head.append("protected " if m["protected"] else "NOT protected ", style="bold")
        head.append(
            f"RPO {rpo}  throttle {throttle}"
            f"  verify every sync {'yes' if m.get('verify_every_sync') else 'no'}"
        )
        if m.get("failed_syncs"):
            head.append(
                f"\n✗ {m['failed_syncs']} failed sync(s) in a row: see SYNC HISTORY", style="bold"
            )
        self.query_one("#m-head", Static).update(head)
        disks = self.query_one("#m-disks", DataTable)
        disks.clear()
        for d in m.get("disks", []):
            disks.add_row(d["key"], fmt.size(d["size"]), d.get("label") or "-")
        rps = self.query_one("#m-rps", DataTable)
        cur = rps.cursor_row
        rps.clear()
        points = m.get("restore_points", [])
        for i, rp in enumerate(reversed(points)):
            rps.add_row(*rp_row(rp, now, i == 0), key=str(rp["id"]))
        if points:
            rps.move_cursor(row=min(cur, len(points) - 1))
        jobs = self.query_one("#m-jobs", DataTable)
        jobs.clear()
        for j in m.get("jobs", []):
            note = (j.get("error") or "")[:80] or job_note(j.get("result"))
            jobs.add_row(
                str(j["id"]),
                j["kind"],
                fmt.job_state(j["state"]),
                fmt.clock(j.get("ended_at"), now),
                note,
            )
        self.render_inspect()
        if not any(j["state"] in ("queued", "running") for j in m.get("jobs", [])):
            self.query_one("#m-progress-row").display = False

    def render_inspect(self) -> None:
        """The point under preview, else the newest: its inspection, then the preview."""
        points = {rp["id"]: rp for rp in (self.machine or {}).get("restore_points", [])}
        p = self.preview
        rp_id = p.rp_id if p else max(points, default=None)
        data = self.inspected.get(rp_id) if rp_id is not None else None
        if data is None and rp_id in points:
            data = points[rp_id].get("inspection")
        text = inspection_text(data)
        if p:
            text.append("\n")
            text.append_text(preview_text(p.rp_id, p.step, p.data))
        self.query_one("#m-inspect", Static).update(text)

    def on_machine_screen_previewed(self, msg: Previewed) -> None:
        self.preview = msg
        if msg.step in ("inspected", "blocked"):
            self.inspected[msg.rp_id] = msg.data
        if msg.step == "inspected":
            msg.step = "converting"
        self.render_inspect()
        # at 80x24 the pane is a few lines high: show where the preview stands
        self.call_after_refresh(self.query_one("#m-inspect-pane").scroll_end, animate=False)

    def on_job_progressed(self, msg: JobProgressed) -> None:
        job = msg.job
        row = self.query_one("#m-progress-row")
        p = job.get("progress") or {}
        row.display = job["state"] in ("queued", "running")
        bar = self.query_one("#m-bar", ProgressBar)
        if p.get("total"):
            bar.update(total=p["total"], progress=p.get("done", 0))
        bar.display = job["state"] == "running" and bool(p.get("total"))
        if job["state"] == "queued":
            text = f"… {job['kind']} {job['id']} queued: starts when the daemon has a free slot"
        else:
            eta = fmt.duration(p.get("eta_s")) if p.get("eta_s") is not None else "-"
            text = (
                f"{fmt.job_state(job['state'])} {job['kind']} {job['id']}: "
                f"{p.get('phase', '')} {fmt.rate(p.get('rate'))} ETA {eta}"
            )
        self.query_one("#m-job", Static).update(text)

    # -- actions ------------------------------------------------------------------------------

    def action_sync(self, full: bool) -> None:
        self.start_sync(full)

    @work(
        thread=True, exclusive=True, exit_on_error=False, group="action", name="Starting the sync"
    )
    def start_sync(self, full: bool) -> None:
        job = self.services.client.sync(self.machine_name, full=full)
        self.post_message(
            JobSubmitted(f"{'full ' if full else ''}sync of {self.machine_name} started", job)
        )
        self.app.call_from_thread(self.load)

    def selected_rp(self) -> int | None:
        t = self.query_one("#m-rps", DataTable)
        if not t.row_count:
            return None
        key = t.coordinate_to_cell_key(t.cursor_coordinate).row_key.value
        return int(key) if key else None

    def action_verify(self) -> None:
        rp = self.selected_rp()
        if rp is None:
            self.notify(
                "this machine has no restore point yet: sync it first (s)",
                title="Nothing to verify",
            )
            return
        self.start_verify(rp)

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="action",
        name="Starting the verification",
    )
    def start_verify(self, rp_id: int) -> None:
        job = self.services.client.verify(rp_id)
        self.post_message(JobSubmitted(f"verification of restore point {rp_id} started", job))
        self.app.call_from_thread(self.load)

    def action_convert_preview(self) -> None:
        rp = self.selected_rp()
        if rp is None:
            self.notify(
                "this machine has no restore point yet: sync it first (s)",
                title="Nothing to convert",
            )
            return
        if any(w.is_running for w in self.own_workers() if w.group == "preview"):
            self.notify("one preview at a time: wait for the running one", title="Convert preview")
            return
        self.convert_preview(rp)

    @work(thread=True, exclusive=True, exit_on_error=False, group="preview", name="Convert preview")
    def convert_preview(self, rp_id: int) -> None:
        """Inspect (preflight verdict), then convert onto a throw-away overlay the daemon
        deletes: both are ferrymand jobs, followed here until they end."""
        c = self.services.client
        self.post_message(self.Previewed(rp_id, "inspecting", {}))
        try:
            job = self._follow(c.inspect(rp_id), f"inspection of restore point {rp_id}")
            verdict = job["result"]
            ok = bool((verdict.get("preflight") or {}).get("ok"))
            self.post_message(self.Previewed(rp_id, "inspected" if ok else "blocked", verdict))
            if ok:
                job = self._follow(c.convert_preview(rp_id), f"conversion of point {rp_id}")
                self.post_message(self.Previewed(rp_id, "converted", job["result"]))
        except FerrymanError as e:
            self.post_message(self.Previewed(rp_id, "failed", {"error": e.message}))
            raise
        finally:
            self.app.call_from_thread(self.load)

    def _follow(self, job: dict[str, Any], what: str) -> dict[str, Any]:
        """Poll a job of ours until it ends (in the worker thread); its result or an error."""
        self.post_message(JobSubmitted(f"{what} started", job))
        c = self.services.client
        while job["state"] in ("queued", "running"):
            time.sleep(PREVIEW_POLL_S)
            job = c.job(job["id"])
            self.post_message(JobProgressed(job))
        if job["state"] != "succeeded":
            raise FerrymanError(
                f"{what} {job['state']}: {job.get('error') or 'no reason given'}",
                hint=f"details: ferryman job show {job['id']}",
            )
        return job

    def action_protect(self) -> None:
        self.app.push_screen(
            ProtectDialog(self.machine_name, self.machine),
            lambda done: self.load() if done else None,
        )

    def action_unprotect(self) -> None:
        self.unprotect()

    @work(
        thread=True,
        exclusive=True,
        exit_on_error=False,
        group="action",
        name="Unprotecting the machine",
    )
    def unprotect(self) -> None:
        self.services.client.unprotect(self.machine_name)
        self.post_message(
            ActionDone(f"{self.machine_name} is no longer protected", "its restore points are kept")
        )
        self.app.call_from_thread(self.load)
