"""The conversion entry points the daemon, CLI and benchmark call.

    create_overlay(restore_point, overlay)            throw-away qcow2 over the restore point
    inspect_image(image)                              -> Inspection   (inspect.py)
    preflight(inspection, backend=...)                -> Verdict      (preflight.py)
    convert(restore_point, overlay, ...)              -> ConvertResult
    verify(overlay)                                   -> VerifyReport (verify.py)
    convert_many(jobs, ...)                           parallel, bounded by cores and memory

``convert`` never writes the restore point: it creates the overlay (or refuses an existing one)
and does everything there. Progress goes to ``progress(step, fraction)``; ``cancel`` is checked
between steps.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from appliance.convert import customise as customise_mod
from appliance.convert import linux
from appliance.convert.errors import ConversionFailed, ConvertError, PreflightRefused
from appliance.convert.files import GuestfsFiles
from appliance.convert.gfs import guarded, open_disks
from appliance.convert.inspect import inspect_handle, inspect_image, refresh
from appliance.convert.preflight import Backend, Verdict, preflight
from appliance.convert.v2v import run_virt_v2v_in_place
from appliance.convert.verify import check
from appliance.errors import Cancelled, FerrymanError
from appliance.units import GiB, MiB

log = logging.getLogger(__name__)

Progress = Callable[[str, float], None]
# "append": virtio modules appended as a second cpio (initramfs-tools guests; seconds).
# "guest-tool": the guest's update-initramfs/dracut/mkinitcpio rebuilds the boot kernel's image.
InitramfsStrategy = Literal["append", "guest-tool"]
CONVERT_TIMEOUT = 1800.0  # seconds for one conversion under TCG, launch included
# What one conversion holds: the libguestfs appliance (qemu, default 1280 MiB under TCG in
# Debian's libguestfs 1.48 it is 1280) plus the Python side.
MEMORY_PER_CONVERSION = 1536 * MiB


@dataclass
class ConvertResult:
    backend: str
    restore_point: str
    overlay: str
    seconds: float
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds
    changes: list[str] = field(default_factory=list)
    verdict: dict[str, Any] = field(default_factory=dict)
    verify: dict[str, Any] = field(default_factory=dict)
    log: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def create_overlay(restore_point: Path, overlay: Path) -> Path:
    """A new qcow2 overlay backed by ``restore_point``; refuses to replace an existing file."""
    if overlay.exists():
        raise ConvertError(
            f"overlay {overlay} already exists",
            hint="name a new overlay, or delete the old one if no test run uses it",
        )
    if not restore_point.exists():
        raise ConvertError(
            f"restore point {restore_point} does not exist",
            hint="list the machine's restore points",
        )
    overlay.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            str(restore_point.resolve()),
            "-F",
            "qcow2",
            str(overlay),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise ConvertError(
            f"cannot create overlay {overlay} over {restore_point}: {r.stderr.strip()}",
            hint="check free space in the volume store",
        )
    return overlay


class _Steps:
    def __init__(self, progress: Progress | None, cancel: threading.Event | None, total: int):
        self.progress, self.cancel, self.total = progress, cancel, total
        self.done = 0
        self.times: dict[str, float] = {}
        self._name: str | None = None
        self._t0 = 0.0

    def __call__(self, name: str) -> None:
        self.finish()
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"conversion cancelled before {name}")
        self._name, self._t0 = name, time.monotonic()
        if self.progress:
            self.progress(name, self.done / self.total)
        self.done += 1

    def finish(self) -> None:
        if self._name is not None:
            self.times[self._name] = round(time.monotonic() - self._t0, 1)
            self._name = None


def convert(
    restore_point: Path,
    overlay: Path,
    *,
    backend: Backend | None = None,
    plan: dict[str, Any] | None = None,
    keys: dict[str, str] | None = None,
    virtio_win: Path | None = None,
    virt_tools_dir: Path | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    timeout: float = CONVERT_TIMEOUT,
    log_dir: Path | None = None,
    initramfs: InitramfsStrategy = "append",
) -> ConvertResult:
    """Convert the guest of ``restore_point`` into a new overlay ``overlay``.

    ``plan`` is the machine's customisation (see customise.py). Raises PreflightRefused with
    every blocker, ConversionFailed, VerifyFailed-free: verification problems are reported in
    the result (``verify.ok``) because a test boot is the final judge.
    """
    custom = customise_mod.Customisation.from_plan(plan)
    t0 = time.monotonic()
    create_overlay(restore_point, overlay)
    v2v_args = (virtio_win, virt_tools_dir, progress, cancel, timeout, log_dir)
    try:
        if backend == "virt-v2v":
            result = _convert_v2v(restore_point, overlay, custom, keys, *v2v_args)
        else:
            try:
                result = _convert_builtin(
                    restore_point,
                    overlay,
                    custom,
                    keys,
                    progress,
                    cancel,
                    timeout,
                    initramfs,
                    switch_to_v2v=backend is None,
                )
            except _IsWindows:
                # No backend chosen and the guest is Windows: virt-v2v is its default.
                result = _convert_v2v(restore_point, overlay, custom, keys, *v2v_args)
    except BaseException:
        overlay.unlink(missing_ok=True)  # a half-converted overlay is worthless
        raise
    result.seconds = round(time.monotonic() - t0, 1)
    if progress:
        progress("done", 1.0)
    return result


class _IsWindows(Exception):
    """Raised inside the built-in path when inspection finds Windows and no backend was set."""


def _refuse(verdict: Verdict, what: Path) -> None:
    if not verdict.ok:
        reasons = [f"{b.message} ({b.fix})" for b in verdict.blockers]
        raise PreflightRefused(
            f"preflight refused to convert {what}: " + "; ".join(reasons),
            blockers=reasons,
            hint=verdict.blockers[0].fix,
        )


def _convert_builtin(
    restore_point: Path,
    overlay: Path,
    custom: customise_mod.Customisation,
    keys: dict[str, str] | None,
    progress: Progress | None,
    cancel: threading.Event | None,
    timeout: float,
    initramfs: InitramfsStrategy,
    *,
    switch_to_v2v: bool = False,
) -> ConvertResult:
    steps = _Steps(progress, cancel, 8)
    changes: list[str] = []
    steps("launch")
    with (
        open_disks([overlay], readonly=False, timeout=timeout) as g,
        guarded(g, timeout, f"conversion of {overlay}"),
    ):
        steps("inspect")
        insp = inspect_handle(g, image=str(overlay), keys=keys, writable=True)
        if insp.os_type == "windows" and switch_to_v2v:
            raise _IsWindows
        verdict = preflight(insp, backend="builtin")
        _refuse(verdict, restore_point)
        files = GuestfsFiles(g)
        kernel = linux.boot_kernel(insp)
        assert kernel is not None  # the preflight blocks guests without one

        steps("remove-tools")
        cmd = linux.remove_tools_command(insp)
        if cmd is not None:
            linux.run_in_guest(g, cmd)
            changes.append(f"tools: {cmd.why}")

        steps("configure")
        changes += linux.edit_configuration(files, insp)
        if not custom.empty and insp.family in ("debian", "rhel", "suse", "arch"):
            changes += customise_mod.apply(files, insp.family, custom)  # type: ignore[arg-type]

        steps("initramfs")
        ch, cmds = linux.configure_initramfs(files, insp, kernel)
        changes += ch
        if initramfs == "append" and insp.family == "debian":
            changes += linux.append_virtio_initramfs(g, files, insp, kernel)
        else:
            for c in cmds:
                linux.run_in_guest(g, c)
                changes.append(f"initramfs: {c.why}")

        steps("bootloader")
        changes += linux.rebuild_grub(g, files, insp)

        steps("verify")
        g.sync()
        report = check(refresh(g, insp))
        g.umount_all()
        steps("close")
    steps.finish()
    return ConvertResult(
        backend="builtin",
        restore_point=str(restore_point),
        overlay=str(overlay),
        seconds=0.0,
        steps=steps.times,
        changes=changes,
        verdict=verdict.to_dict(),
        verify=report.to_dict(),
    )


def _convert_v2v(
    restore_point: Path,
    overlay: Path,
    custom: customise_mod.Customisation,
    keys: dict[str, str] | None,
    virtio_win: Path | None,
    virt_tools_dir: Path | None,
    progress: Progress | None,
    cancel: threading.Event | None,
    timeout: float,
    log_dir: Path | None,
) -> ConvertResult:
    steps = _Steps(progress, cancel, 4)
    steps("inspect")
    insp = inspect_image(overlay, keys=keys, timeout=timeout)
    verdict = preflight(
        insp, backend="virt-v2v", virtio_win=virtio_win, virt_tools_dir=virt_tools_dir
    )
    _refuse(verdict, restore_point)
    steps("virt-v2v")
    log_path = (log_dir or overlay.parent) / f"{overlay.name}.virt-v2v.log"
    run_virt_v2v_in_place(
        overlay,
        log_path=log_path,
        virtio_win=virtio_win,
        virt_tools_dir=virt_tools_dir,
        timeout=timeout,
        cancel=cancel,
    )
    changes = ["virt-v2v-in-place converted the guest"]
    steps("fix-ups")
    with (
        open_disks([overlay], readonly=False, timeout=timeout) as g,
        guarded(g, timeout, f"fix-ups of {overlay}"),
    ):
        after = inspect_handle(g, image=str(overlay), keys=keys, writable=True)
        report = check(after)
        files = GuestfsFiles(g)
        if after.os_type == "linux" and any("device name" in p for p in report.problems):
            # virt-v2v regenerates grub.cfg inside its appliance; with
            # GRUB_DISABLE_LINUX_UUID=true that writes root=/dev/sda1 again, which does not
            # exist on virtio. Same fix as the built-in converter: UUIDs, then update-grub.
            changes += [f"fix-up: {c}" for c in linux.edit_configuration(files, after)]
            changes += [f"fix-up: {c}" for c in linux.rebuild_grub(g, files, after)]
        if not custom.empty:
            if after.os_type != "linux":
                raise ConversionFailed(
                    f"{overlay}: plan customisation applies to Linux guests only",
                    hint="set Windows addresses with the guest's own tools after the first boot",
                )
            changes += customise_mod.apply(files, after.family, custom)  # type: ignore[arg-type]
        steps("verify")
        g.sync()
        report = check(refresh(g, after))
        g.umount_all()
    steps.finish()
    return ConvertResult(
        backend="virt-v2v",
        restore_point=str(restore_point),
        overlay=str(overlay),
        seconds=0.0,
        steps=steps.times,
        changes=changes,
        verdict=verdict.to_dict(),
        verify=report.to_dict() if report else {},
        log=str(log_path),
    )


# --------------------------------------------------------------------------- parallel


@dataclass
class ConvertJob:
    name: str
    restore_point: Path
    overlay: Path
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to convert()


@dataclass
class ConvertOutcome:
    name: str
    result: ConvertResult | None
    error: dict[str, str | None] | None


def parallel_limit(
    cpus: int | None = None, mem_available: int | None = None, per_job: int = MEMORY_PER_CONVERSION
) -> int:
    """How many conversions may run at once: one per core, and as many as memory holds."""
    cpus = cpus or os.cpu_count() or 1
    if mem_available is None:
        mem_available = _mem_available()
    by_mem = max(1, mem_available // per_job)
    return max(1, min(cpus, by_mem))


def _mem_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2 * GiB


def convert_many(
    jobs: list[ConvertJob],
    *,
    max_parallel: int | None = None,
    progress: Callable[[str, str, float], None] | None = None,
    cancel: threading.Event | None = None,
) -> list[ConvertOutcome]:
    """Convert several machines, at most ``max_parallel`` (default: parallel_limit()) at once.

    ``progress(machine, step, fraction)`` is called from worker threads. One machine's failure
    does not stop the others; each outcome carries its result or its error (as to_dict()).
    """
    limit = max_parallel or parallel_limit()

    def one(job: ConvertJob) -> ConvertOutcome:
        def cb(step: str, frac: float) -> None:
            if progress:
                progress(job.name, step, frac)

        try:
            r = convert(job.restore_point, job.overlay, progress=cb, cancel=cancel, **job.kwargs)
            return ConvertOutcome(job.name, r, None)
        except FerrymanError as e:
            log.warning("conversion of %s failed: %s", job.name, e)
            return ConvertOutcome(job.name, None, e.to_dict())

    with ThreadPoolExecutor(max_workers=limit, thread_name_prefix="convert") as pool:
        return list(pool.map(one, jobs))
