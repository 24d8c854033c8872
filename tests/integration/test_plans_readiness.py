"""Readiness checks against a real transient libvirt domain (TCG, a blank disk: SeaBIOS finds
nothing to boot and the VM keeps running): tcp, agent, delay, console, and the early failure
when the domain is gone."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.plans import virt
from appliance.plans.model import Check
from appliance.plans.readiness import run_check

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture
def domain() -> Iterator[tuple[Any, str, Path]]:
    d = Path(tempfile.mkdtemp(prefix="fm-ready-", dir="/var/tmp"))
    disk = d / "blank.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "16M"], check=True)
    console = d / "console.log"
    name = f"fm-test-ready-{uuid.uuid4().hex[:6]}"
    conn = virt.connect()
    xml = virt.domain_xml(
        virt.DomainSpec(
            name=name,
            title="readiness test",
            memory_mib=128,
            cpus=1,
            disks=[disk],
            console_log=console,
        )
    )
    virt.start_domain(conn, xml)
    try:
        yield conn, name, console
    finally:
        virt.destroy_domain(conn, name)
        conn.close()
        subprocess.run(["rm", "-rf", str(d)], check=False)


def test_checks_on_a_running_domain(domain: tuple[Any, str, Path]) -> None:
    conn, name, console = domain
    stop = threading.Event()
    kw = {"conn": conn, "domain": name, "console": console, "cancel": stop}

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        r = run_check(Check("tcp", 5, address="127.0.0.1", port=port), **kw)  # type: ignore[arg-type]
    assert r.passed and r.detail == f"connected to 127.0.0.1:{port}"
    r = run_check(Check("tcp", 2, address="127.0.0.1", port=port), **kw)  # type: ignore[arg-type]
    assert not r.passed and r.detail.startswith("timeout after 2 s (connect to 127.0.0.1")
    r = run_check(Check("agent", 2), **kw)  # type: ignore[arg-type]
    assert not r.passed and "guest agent" in r.detail.lower()
    r = run_check(Check("delay", 0, seconds=1), **kw)  # type: ignore[arg-type]
    assert r.passed and 0.9 <= r.seconds < 5
    # SeaBIOS prints nothing on the serial line without sgabios: a console check times out.
    t = time.monotonic()
    r = run_check(Check("console", 2, pattern="login:"), **kw)  # type: ignore[arg-type]
    assert not r.passed and "timeout after 2 s" in r.detail and time.monotonic() - t < 10
    # Cancel ends a long check at once.
    threading.Timer(0.5, stop.set).start()
    r = run_check(Check("delay", 0, seconds=600), **kw)  # type: ignore[arg-type]
    assert not r.passed and r.detail == "cancelled" and r.seconds < 5
    # A domain that is gone fails the check at once, naming it.
    virt.destroy_domain(conn, name)
    r = run_check(
        Check("tcp", 300, address="127.0.0.1", port=9), **{**kw, "cancel": threading.Event()}
    )  # type: ignore[arg-type]
    assert not r.passed and r.detail == f"domain {name} is absent" and r.seconds < 5
    assert os.path.exists(console)
