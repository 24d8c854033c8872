"""Errors of the vSphere source.

Each names the object (endpoint, VM, disk), what went wrong and the fix. None of them ever
carries a password or a session cookie: messages are built from names, fingerprints and
fault names only, and pyVmomi faults are chained with ``from`` (their text holds no secret).
"""

from __future__ import annotations

from appliance.errors import FerrymanError


class VSphereError(FerrymanError):
    code = "vsphere"
    http_status = 502


class VSphereUnreachable(VSphereError):
    code = "vsphere_unreachable"


class CertificateUnconfirmed(VSphereError):
    """First contact: the certificate is not trusted by the system CAs and no pin exists."""

    code = "vsphere_certificate_unconfirmed"
    http_status = 409

    def __init__(self, endpoint: str, presented: str, detail: str) -> None:
        super().__init__(
            f"{endpoint}: certificate not trusted by the system CAs ({detail}); "
            f"presented SHA-256 fingerprint {presented}",
            hint="compare it with the fingerprint shown on the vCenter/ESXi console and "
            "register again with that fingerprint pinned",
        )
        self.endpoint = endpoint
        self.presented = presented


class CertificateChanged(VSphereError):
    """The presented certificate is not the pinned one. Nothing was sent to the server."""

    code = "vsphere_certificate_changed"
    http_status = 409

    def __init__(self, endpoint: str, expected: str, presented: str) -> None:
        super().__init__(
            f"{endpoint}: certificate changed: expected SHA-256 {expected}, "
            f"presented {presented}; no credentials were sent",
            hint="if the certificate was renewed on purpose, confirm the new fingerprint with "
            "the vSphere administrator and update the pin; otherwise suspect interception",
        )
        self.endpoint = endpoint
        self.expected = expected
        self.presented = presented


class LoginFailed(VSphereError):
    code = "vsphere_login_failed"
    http_status = 401

    def __init__(self, endpoint: str, user: str) -> None:
        super().__init__(
            f"{endpoint}: login as {user!r} refused (wrong user name or password)",
            hint="check the account in vCenter (SSO domain, e.g. user@vsphere.local) and "
            "update the stored credential",
        )


class VMNotFound(VSphereError):
    code = "vsphere_vm_not_found"
    http_status = 404


class PreflightRefused(VSphereError):
    """The VM cannot be protected as it is. ``reasons`` lists every blocker."""

    code = "vsphere_preflight"
    http_status = 409

    def __init__(self, vm: str, reasons: list[str]) -> None:
        super().__init__(
            f"VM {vm} cannot be protected: " + "; ".join(reasons),
            hint="fix each listed item in vSphere, then run protect again",
        )
        self.vm = vm
        self.reasons = reasons


class ChangeTrackingError(VSphereError):
    code = "vsphere_cbt"


class SnapshotError(VSphereError):
    code = "vsphere_snapshot"
    fault: object = None  # the vSphere fault, when a task failed


class TaskFailed(VSphereError):
    code = "vsphere_task"
    fault: object = None  # the vSphere fault of the task, for callers that branch on its type


class DatastoreReadError(VSphereError):
    code = "vsphere_datastore_read"


class PowerError(VSphereError):
    code = "vsphere_power"
