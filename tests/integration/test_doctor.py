"""`ferryman doctor --json` checks every part for real, with a verdict and a fix."""

from __future__ import annotations

import json

import pytest

from tests.helpers.daemon import Daemon, Env, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

PARTS = {
    "qemu-img",
    "qemu-nbd",
    "qemu-system-x86_64",
    "nbdkit",
    "nbdcopy",
    "virsh",
    "virt-v2v-in-place",
    "ssh",
    "python: nbd",
    "python: guestfs",
    "python: libvirt",
    "python: hivex",
    "virtlogd",
    "libvirtd",
    "libguestfs launch",
    "accelerator",
    "volume store space",
    "state store",
    "secret key",
    "ferrymand",
}


def test_doctor_reports_every_part(daemon: Daemon, fm_env: Env) -> None:
    r = run_cli(fm_env, "doctor", "--json", timeout=360)
    body = json.loads(r.stdout)
    checks = {c["part"]: c for c in body["checks"]}
    assert set(checks) == PARTS
    for c in body["checks"]:
        assert c["verdict"] in ("ok", "warn", "fail"), c  # nothing skipped in a full run
        if c["verdict"] == "fail":
            assert c["fix"], c
    # This machine has every part installed (scripts/test installs them) ...
    failing = [c for c in body["checks"] if c["verdict"] == "fail"]
    assert failing == [] and body["ok"] is True and r.returncode == 0, failing
    assert checks["libguestfs launch"]["detail"].startswith("launched in")
    assert checks["ferrymand"]["detail"].startswith(f"pid {daemon.proc.pid}")
    # ... and a usable accelerator: KVM, or TCG with a warning that says what it costs.
    acc = checks["accelerator"]
    assert acc["verdict"] == "ok" or ("TCG works" in acc["detail"] and acc["fix"])


def test_doctor_names_the_fix_for_a_missing_daemon(fm_env: Env) -> None:
    r = run_cli(fm_env, "doctor", "--quick", "--json")
    checks = {c["part"]: c for c in json.loads(r.stdout)["checks"]}
    assert checks["ferrymand"]["verdict"] == "warn"
    assert "start it" in checks["ferrymand"]["fix"]
    assert checks["state store"]["verdict"] == "warn"
    assert checks["libguestfs launch"]["verdict"] == "skip"
