"""vSphere through ferrymand and the CLI, against vcsim: register with a pinned thumbprint,
discover, protect (preflight + CBT), full and incremental sync, each point equal to the
datastore file; and row 23: a canary password appears nowhere (logs, store files, API
answers, /proc/*/cmdline during the sync, a failed login, the support bundle)."""

# ruff: noqa: F811  (fixtures come from tests/vsphere_fixtures.py)
from __future__ import annotations

import json
import os
import tarfile
import threading
from pathlib import Path

import pytest

from appliance.units import MiB
from tests.helpers.daemon import Daemon, Env, run_cli
from tests.helpers.nbdsrc import assert_equal, cli
from tests.vsphere_fixtures import (  # noqa: F401
    VsphereVm,
    vcsim,
    vcsim_binary,
    vcsim_factory,
    vsphere_certs,
    vsphere_vm,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def cmdlines() -> list[bytes]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                pass
    return out


@pytest.mark.row(23)
def test_vsphere_through_the_daemon_and_no_secret_leaks(
    daemon: Daemon, fm_env: Env, vsphere_vm: VsphereVm
) -> None:
    v = vsphere_vm.vcsim
    canary = v.password
    uri = f"https://{v.host}:{v.port}"
    pw = fm_env.root / "vc.pw"
    pw.write_text(canary + "\n")
    pw.chmod(0o600)

    # First contact: not trusted by the system CAs -> refused, with the fingerprint to check.
    r = run_cli(
        fm_env,
        "source",
        "add",
        "vc01",
        "--kind",
        "vsphere",
        "--uri",
        uri,
        "--user",
        v.user,
        "--password-file",
        str(pw),
    )
    assert r.returncode == 1 and v.sha256 in r.stderr and "--thumbprint" in r.stderr
    tls = cli(fm_env, "source", "tls", uri)
    assert tls["thumbprint"] == v.sha256
    # A wrong password fails the registration test, naming no secret.
    bad = fm_env.root / "bad.pw"
    bad.write_text(canary + "-wrong\n")
    r = run_cli(
        fm_env,
        "source",
        "add",
        "vc01",
        "--kind",
        "vsphere",
        "--uri",
        uri,
        "--user",
        v.user,
        "--password-file",
        str(bad),
        "--thumbprint",
        v.sha256,
    )
    assert r.returncode == 1
    cli(
        fm_env,
        "source",
        "add",
        "vc01",
        "--kind",
        "vsphere",
        "--uri",
        uri,
        "--user",
        v.user,
        "--password-file",
        str(pw),
        "--thumbprint",
        v.sha256,
    )
    cli(fm_env, "discover", "vc01", "--wait")
    cli(fm_env, "protect", "ferry01")

    seen: list[bytes] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.extend(c for c in cmdlines() if b"nbdkit" in c or b"ferryman" in c)
            stop.wait(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        first = cli(fm_env, "sync", "ferry01", "--wait")
    finally:
        stop.set()
        t.join()
    assert first["state"] == "succeeded" and first["result"]["full"] is True
    assert any(b"nbdkit" in c for c in seen), "no reader process was observed"
    point = Path(cli(fm_env, "points", "ferry01")[-1]["disks"][0]["path"])
    assert_equal(vsphere_vm.flat, point)

    with open(vsphere_vm.flat, "r+b") as f:  # the guest writes 2 MiB
        f.seek(60 * MiB)
        f.write(os.urandom(2 * MiB))
    second = cli(fm_env, "sync", "ferry01", "--wait")["result"]
    assert second["full"] is False and second["bytes_written"] <= 3 * MiB, second
    point = Path(cli(fm_env, "points", "ferry01")[-1]["disks"][0]["path"])
    assert_equal(vsphere_vm.flat, point)

    bundle = fm_env.root / "bundle.tar.gz"
    cli(fm_env, "support-bundle", "--output", str(bundle))

    # Row 23: the canary is nowhere.
    needle = canary.encode()
    assert not [c for c in seen if needle in c], "password in a command line"
    answers = json.dumps(
        [
            cli(fm_env, "sources"),
            cli(fm_env, "events", "--limit", "500"),
            cli(fm_env, "audit-log", "--limit", "500"),
            cli(fm_env, "machine", "show", "ferry01"),
        ]
    )
    assert canary not in answers
    ours = [Path(p) for p in fm_env.vars().values()] + [fm_env.log]  # store, volumes, run, logs
    files = [f for d in ours for f in ([d] if d.is_file() else d.rglob("*")) if f.is_file()]
    assert fm_env.db in files and fm_env.log in files
    for f in files:
        assert needle not in f.read_bytes(), f"password found in {f}"
    with tarfile.open(bundle) as tar:
        for m in tar.getmembers():
            if m.isfile():
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                assert needle not in data, f"password in the support bundle: {m.name}"
