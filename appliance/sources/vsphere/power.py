"""Power control for cutover and rollback.

Cutover stops the source cleanly when it can: a guest shutdown through VMware Tools, then a
hard power-off if the guest has not stopped within the timeout (or has no Tools). Rollback
powers it on again. Every outcome says which way the VM went down, for the cutover report.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from appliance.sources.vsphere._vmomi import vim, vmodl
from appliance.sources.vsphere.client import VSphereClient, fault_text
from appliance.sources.vsphere.errors import PowerError, TaskFailed

log = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 300.0  # seconds; Windows updates on shutdown can take minutes
POLL = 1.0  # seconds between power-state reads


@dataclass(frozen=True)
class PowerResult:
    vm: str
    action: str  # "guest-shutdown" | "power-off" | "already-off" | "power-on" | "already-on"
    seconds: float
    note: str = ""


def _state(client: VSphereClient, vm: Any) -> str:
    return str(client.props(vm, ["runtime.powerState"]).get("runtime.powerState", ""))


def stop(
    client: VSphereClient,
    vm: Any,
    *,
    timeout: float = SHUTDOWN_TIMEOUT,
    clock: Any = time.monotonic,
    sleep: Any = time.sleep,
) -> PowerResult:
    """Guest shutdown through Tools; power off when that is impossible or takes too long."""
    t0 = clock()
    p = client.props(vm, ["name", "runtime.powerState", "guest.toolsRunningStatus"])
    name = p.get("name", vm._moId)
    if p.get("runtime.powerState") == "poweredOff":
        return PowerResult(vm._moId, "already-off", 0.0)
    note = ""
    if p.get("guest.toolsRunningStatus") == "guestToolsRunning":
        try:
            vm.ShutdownGuest()
            log.info("%s: guest shutdown requested", name)
            while clock() - t0 < timeout:
                if _state(client, vm) == "poweredOff":
                    return PowerResult(vm._moId, "guest-shutdown", clock() - t0)
                sleep(POLL)
            note = f"guest did not shut down within {timeout:.0f} s"
        except vmodl.MethodFault as e:
            note = f"guest shutdown refused ({fault_text(e)})"
    else:
        note = "VMware Tools not running"
    log.warning("%s: %s; powering off", name, note)
    try:
        client.wait(vm.PowerOffVM_Task(), f"power-off of {name}", timeout=timeout)
    except TaskFailed as e:
        if _state(client, vm) != "poweredOff":
            raise PowerError(
                f"{name}: could not power off: {e.message}",
                hint="power it off in vSphere, then continue the cutover",
            ) from e
    return PowerResult(vm._moId, "power-off", clock() - t0, note)


def start(client: VSphereClient, vm: Any, *, timeout: float = SHUTDOWN_TIMEOUT) -> PowerResult:
    """Power the source on again (rollback)."""
    t0 = time.monotonic()
    name = client.props(vm, ["name"]).get("name", vm._moId)
    if _state(client, vm) == "poweredOn":
        return PowerResult(vm._moId, "already-on", 0.0)
    try:
        client.wait(vm.PowerOnVM_Task(), f"power-on of {name}", timeout=timeout)
    except TaskFailed as e:
        raise PowerError(
            f"{name}: could not power on: {e.message}",
            hint="check the host's resources and the VM's events in vSphere",
        ) from e
    return PowerResult(vm._moId, "power-on", time.monotonic() - t0)


__all__ = ["PowerResult", "start", "stop", "vim"]
