"""VMware vSphere source: agentless CBT replication of vCenter/ESXi VMs (docs/vsphere.md).

Entry points for the daemon, store and CLI:

- :class:`Endpoint` (+ :class:`TlsPolicy`): what registration stores; holds no password.
- :func:`probe`: the certificate an endpoint presents, for the operator to confirm.
- :class:`VSphereSource`: ``test``, ``discover``, ``preflight``, ``protect``, ``open_session``,
  ``stop_machine``, ``start_machine``.
- :class:`Secret`: the only way a password enters; the credential store hands one out.
"""

from appliance.sources.vsphere.client import Endpoint, Secret, VSphereClient
from appliance.sources.vsphere.errors import (
    CertificateChanged,
    CertificateUnconfirmed,
    ChangeTrackingError,
    DatastoreReadError,
    LoginFailed,
    PowerError,
    PreflightRefused,
    SnapshotError,
    TaskFailed,
    VMNotFound,
    VSphereError,
    VSphereUnreachable,
)
from appliance.sources.vsphere.power import PowerResult
from appliance.sources.vsphere.protect import PreflightReport
from appliance.sources.vsphere.source import (
    ProtectResult,
    VSphereDiskExport,
    VSphereSource,
    VSphereSyncSession,
)
from appliance.sources.vsphere.tls import PresentedCertificate, TlsPolicy, probe

__all__ = [
    "CertificateChanged",
    "CertificateUnconfirmed",
    "ChangeTrackingError",
    "DatastoreReadError",
    "Endpoint",
    "LoginFailed",
    "PowerError",
    "PowerResult",
    "PreflightRefused",
    "PreflightReport",
    "PresentedCertificate",
    "ProtectResult",
    "Secret",
    "SnapshotError",
    "TaskFailed",
    "TlsPolicy",
    "VMNotFound",
    "VSphereClient",
    "VSphereDiskExport",
    "VSphereError",
    "VSphereSource",
    "VSphereSyncSession",
    "VSphereUnreachable",
    "probe",
]
