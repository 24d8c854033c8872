"""``ferryman doctor``: is every part of the appliance there and working?

Each check returns a row: part, verdict (ok / warn / fail / skip), detail, fix. A failing row
always says how to fix it, because the reader is on a customer's console with no internet.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from appliance import probe
from appliance.config import paths
from appliance.units import GiB, human_bytes

APT = "apt-get install -y"
MIN_FREE_FAIL = 2 * GiB  # below this a full sync of even a small disk cannot finish
MIN_FREE_WARN = 20 * GiB  # below this one typical server's chain does not fit
GUESTFS_TIMEOUT_S = 180  # one libguestfs launch under TCG takes ~20 s; loaded machines more


@dataclass
class Check:
    part: str
    verdict: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"\d+\.\d+(\.\d+)?", out)
    return m.group(0) if m else out.strip()[:40]


BINARIES = [
    # (binary, version argv, Debian package)
    ("qemu-img", ["qemu-img", "--version"], "qemu-utils"),
    ("qemu-nbd", ["qemu-nbd", "--version"], "qemu-utils"),
    ("qemu-system-x86_64", ["qemu-system-x86_64", "--version"], "qemu-system-x86"),
    ("nbdkit", ["nbdkit", "--version"], "nbdkit"),
    ("nbdcopy", ["nbdcopy", "--version"], "libnbd-bin"),
    ("virsh", ["virsh", "--version"], "libvirt-clients"),
    ("virt-v2v-in-place", ["virt-v2v-in-place", "--version"], "virt-v2v"),
    ("ssh", ["ssh", "-V"], "openssh-client"),
]

BINDINGS = [
    ("nbd", "python3-libnbd"),
    ("guestfs", "python3-guestfs"),
    ("libvirt", "python3-libvirt"),
    ("hivex", "python3-hivex"),
]


def check_binaries() -> list[Check]:
    out = []
    for name, argv, pkg in BINARIES:
        if shutil.which(name):
            v = _version(argv if name != "ssh" else ["sh", "-c", "ssh -V 2>&1"])
            out.append(Check(name, "ok", f"version {v}" if v else "present"))
        else:
            out.append(Check(name, "fail", "not installed", f"{APT} {pkg}"))
    return out


def check_bindings() -> list[Check]:
    out = []
    for mod, pkg in BINDINGS:
        try:
            m = importlib.import_module(mod)
            v = getattr(m, "__version__", "") or ""
            out.append(Check(f"python: {mod}", "ok", f"importable {v}".strip()))
        except ImportError as e:
            out.append(
                Check(
                    f"python: {mod}",
                    "fail",
                    f"cannot import: {e}",
                    f"{APT} {pkg}; run Ferryman from a venv built with "
                    "/usr/bin/python3 --system-site-packages",
                )
            )
    return out


def check_libvirt() -> list[Check]:
    out = []
    virtlogd = subprocess.run(["pgrep", "-x", "virtlogd"], capture_output=True).returncode == 0
    out.append(
        Check(
            "virtlogd",
            "ok" if virtlogd else "fail",
            "running" if virtlogd else "not running",
            "" if virtlogd else "start it: systemctl start virtlogd (or virtlogd -d)",
        )
    )
    kvm = _kvm_group_check()
    if kvm is not None:
        out.append(kvm)
    try:
        import libvirt

        libvirt.registerErrorHandler(lambda _c, _e: None, None)
        conn = libvirt.open("qemu:///system")
        try:
            v = conn.getLibVersion()
            out.append(
                Check(
                    "libvirtd",
                    "ok",
                    f"qemu:///system answers, libvirt {v // 1000000}.{v // 1000 % 1000}",
                )
            )
        finally:
            conn.close()
    except Exception as e:
        out.append(
            Check(
                "libvirtd",
                "fail",
                f"qemu:///system does not answer: {e}",
                "start it: systemctl start libvirtd (or libvirtd -d)",
            )
        )
    return out


def _kvm_group_check() -> Check | None:
    """/dev/kvm must belong to group kvm (udev's rule), or libvirtd re-probes qemu on every call.

    libvirtd checks /dev/kvm as the qemu user; a node that arrived with a foreign gid (seen in
    containers) makes it find its capabilities cache outdated each time: seconds per call,
    minutes per domain start under load.
    """
    import grp

    try:
        st = os.stat("/dev/kvm")
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        return None
    if st.st_gid == kvm_gid:
        return None
    try:
        owner = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        owner = str(st.st_gid)
    return Check(
        "/dev/kvm group",
        "warn",
        f"group {owner}, not kvm: libvirtd re-probes qemu on every call (slow domain starts)",
        "chgrp kvm /dev/kvm (scripts/demo and scripts/test do it)",
    )


def check_guestfs(quick: bool) -> Check:
    if quick:
        return Check("libguestfs launch", "skip", "skipped (--quick)")
    try:
        import guestfs
    except ImportError:
        return Check(
            "libguestfs launch", "fail", "python3-guestfs missing", f"{APT} python3-guestfs"
        )
    start = time.monotonic()
    try:
        g = guestfs.GuestFS(python_return_dict=True)
        g.add_drive_scratch(64 * 1024 * 1024)
        g.launch()
        g.shutdown()
        g.close()
    except Exception as e:
        kernels = list(Path("/boot").glob("vmlinuz-*"))
        fix = (
            ("install a kernel for the appliance: " + f"{APT} linux-image-amd64")
            if not kernels
            else "run libguestfs-test-tool and read its last lines"
        )
        return Check("libguestfs launch", "fail", str(e).splitlines()[0][:160], fix)
    settings = os.environ.get("LIBGUESTFS_BACKEND_SETTINGS", "")
    return Check(
        "libguestfs launch",
        "ok",
        f"launched in {time.monotonic() - start:.1f} s" + (f" ({settings})" if settings else ""),
    )


def check_kvm(quick: bool) -> Check:
    if quick:
        return Check("accelerator", "skip", "skipped (--quick)")
    r = probe.probe()
    if r.accel == "kvm":
        return Check("accelerator", "ok", f"KVM works ({r.kvm_detail})")
    if r.accel == "tcg":
        return Check(
            "accelerator",
            "warn",
            f"KVM unusable ({r.kvm_detail}); TCG works ({r.tcg_detail})",
            "guests boot and convert 5-20x slower; enable (nested) virtualisation "
            "on the host for production",
        )
    return Check(
        "accelerator",
        "fail",
        f"no accelerator works: {r.tcg_detail}",
        f"{APT} qemu-system-x86 linux-image-amd64",
    )


def check_space() -> Check:
    vol = paths().volume_dir
    probe_dir = vol
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    st = os.statvfs(probe_dir)
    free = st.f_bavail * st.f_frsize
    detail = f"{human_bytes(free)} free for {vol}"
    if free < MIN_FREE_FAIL:
        return Check(
            "volume store space", "fail", detail, "free space or mount a data disk at " + str(vol)
        )
    if free < MIN_FREE_WARN:
        return Check(
            "volume store space",
            "warn",
            detail,
            "add a data disk for the volume store before protecting large machines",
        )
    return Check("volume store space", "ok", detail)


def check_store() -> Check:
    from appliance.errors import FerrymanError
    from store.db import integrity, open_readonly, schema_version

    db_path = paths().db
    if not db_path.exists():
        return Check(
            "state store",
            "warn",
            f"no store at {db_path} yet",
            "start ferrymand once; it creates the store",
        )
    try:
        db = open_readonly(db_path)
        res = integrity(db)
        ver = schema_version(db)
        db.close()
    except FerrymanError as e:
        return Check("state store", "fail", e.message, e.hint or "")
    if res != ["ok"]:
        return Check(
            "state store",
            "fail",
            f"integrity_check: {res[0]}",
            "stop ferrymand and restore the last backup",
        )
    return Check("state store", "ok", f"{db_path}, schema {ver}, integrity ok")


def check_vault() -> Check:
    """How the key that encrypts source passwords is kept, and that it opens."""
    from appliance.errors import FerrymanError
    from store.secrets import KEY_NAME, Vault, seal

    v = Vault(paths().db.parent / KEY_NAME)  # as ferrymand finds it
    part, where = "secret key", v.describe()["where"]
    if os.geteuid() != 0:
        return Check(part, "warn", f"{where}; only root can open it", "run doctor as root")
    if v.backend == "none":
        try:
            seal(b"doctor")
        except FerrymanError as e:
            return Check(part, "ok", f"{where}; a root-only file ({e.message})")
        return Check(part, "ok", f"{where}; it will be sealed with systemd-creds (host key)")
    try:
        v._key()
    except FerrymanError as e:
        return Check(part, "fail", e.message, e.hint or "")
    if v.backend == "file":
        try:
            seal(b"doctor")
        except FerrymanError as e:
            return Check(part, "ok", f"{where}, opens; systemd-creds unusable: {e.message}")
        return Check(
            part,
            "warn",
            f"{where}, opens; systemd-creds works here but does not guard it",
            "seal it: ferryman store seal-key",
        )
    return Check(part, "ok", f"systemd-creds: {where}, opens")


def check_daemon() -> Check:
    from appliance.client import Client
    from appliance.errors import FerrymanError

    try:
        with Client() as c:
            h = c.health()
        return Check("ferrymand", "ok", f"pid {h['pid']}, version {h['version']}")
    except FerrymanError as e:
        return Check("ferrymand", "warn", e.message, e.hint or "")


def run(quick: bool = False) -> list[Check]:
    steps: list[Callable[[], list[Check]]] = [
        check_binaries,
        check_bindings,
        check_libvirt,
        lambda: [check_guestfs(quick)],
        lambda: [check_kvm(quick)],
        lambda: [check_space()],
        lambda: [check_store()],
        lambda: [check_vault()],
        lambda: [check_daemon()],
    ]
    out: list[Check] = []
    for step in steps:
        out.extend(step())
    return out


def to_json(checks: list[Check]) -> dict[str, object]:
    return {"ok": all(c.verdict != "fail" for c in checks), "checks": [asdict(c) for c in checks]}
