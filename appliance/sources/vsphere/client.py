"""One authenticated pyVmomi session to a vCenter or standalone ESXi.

The credential boundary: a password enters Ferryman only as a :class:`Secret` (or a callable
returning one: the credential store's lookup). It is revealed exactly once per login, as the
argument of ``SessionManager.Login``, and never stored on the client, logged, put in argv or
in an error message. The session cookie the login yields is a credential too: it is handed to
nbdkit through a 0600 file (see :mod:`.reader`), never through argv.

Tasks are awaited through the property collector, reading only ``info.state``, ``info.error``
and ``info.result``: reading the whole ``task.info`` breaks pyVmomi on vcsim (its
RemoveSnapshot task names a snapshot as ``entity``) and costs more on a real vCenter.
"""

from __future__ import annotations

import http.client
import logging
import re
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

from appliance.sources.vsphere import tls as vtls
from appliance.sources.vsphere._vmomi import SmartStubAdapter, vim, vmodl
from appliance.sources.vsphere.errors import (
    CertificateChanged,
    CertificateUnconfirmed,
    LoginFailed,
    TaskFailed,
    VMNotFound,
    VSphereError,
    VSphereUnreachable,
)

log = logging.getLogger(__name__)

HTTP_TIMEOUT = 120.0  # seconds per SOAP call; vCenter answers slowly under load
TASK_TIMEOUT = 1800.0  # seconds; snapshot removal with consolidation can take long


class Secret:
    """A string that never shows itself: repr/str print a mask, also in tracebacks with locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("a Secret is not serialisable; keep it in the credential store")


PasswordSource = Secret | Callable[[], Secret]


@dataclass(frozen=True)
class Endpoint:
    """A registered vCenter or ESXi. Safe to store: holds no password."""

    host: str
    user: str
    port: int = 443
    tls: vtls.TlsPolicy = field(default_factory=vtls.TlsPolicy)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def from_url(cls, url: str, user: str, policy: vtls.TlsPolicy | None = None) -> Endpoint:
        """'vc01.example.com', 'https://vc01:8443/sdk' or '10.0.0.5' -> Endpoint."""
        if "://" not in url:
            url = "https://" + url
        u = urllib.parse.urlsplit(url)
        if u.scheme != "https" or not u.hostname:
            raise ValueError(f"not an https vCenter/ESXi address: {url!r}")
        if u.password:
            raise ValueError("put the password in the credential store, not in the URL")
        return cls(host=u.hostname, user=user, port=u.port or 443, tls=policy or vtls.TlsPolicy())

    @classmethod
    def from_record(
        cls,
        uri: str,
        user: str,
        *,
        thumbprint: str | None = None,
        insecure: bool = False,
        cafile: str | None = None,
    ) -> Endpoint:
        """From a sources-table row (uri, params.user, tls_thumbprint, insecure)."""
        if insecure:
            policy = vtls.TlsPolicy(mode="insecure")
        elif thumbprint:
            policy = vtls.TlsPolicy.pinned(thumbprint)
        else:
            policy = vtls.TlsPolicy(mode="ca", cafile=cafile)
        return cls.from_url(uri, user, policy)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "user": self.user, "tls": self.tls.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Endpoint:
        return cls(
            host=d["host"],
            port=int(d.get("port", 443)),
            user=d["user"],
            tls=vtls.TlsPolicy.from_dict(d.get("tls", {})),
        )


def _fault_name(e: BaseException) -> str:
    return type(e).__name__.rsplit(".", 1)[-1]


def fault_text(e: BaseException) -> str:
    """A one-line description of a vSphere fault (never a request body)."""
    msg = getattr(e, "msg", "") or ""
    return f"{_fault_name(e)}: {msg}".rstrip(": ")


class VSphereClient:
    """A logged-in session. Use as a context manager; ``close()`` logs out."""

    def __init__(
        self, endpoint: Endpoint, password: PasswordSource, *, timeout: float = HTTP_TIMEOUT
    ) -> None:
        self.endpoint = endpoint
        self._password = password
        self._timeout = timeout
        self._ctx: ssl.SSLContext | None = None
        self._si: Any = None
        self.content: Any = None

    # -- session ---------------------------------------------------------------------------

    def connect(self) -> VSphereClient:
        ep = self.endpoint
        ctx = vtls.make_context(ep.tls, ep.address)
        try:
            stub = SmartStubAdapter(
                host=ep.host,
                port=ep.port,
                sslContext=ctx,
                httpConnectionTimeout=self._timeout,
            )
            si = vim.ServiceInstance("ServiceInstance", stub)
            content = si.RetrieveContent()
        except CertificateChanged:
            raise
        except ssl.SSLCertVerificationError as e:
            presented = vtls.probe(ep.host, ep.port).sha256
            raise CertificateUnconfirmed(ep.address, presented, e.verify_message or str(e)) from e
        except (OSError, ssl.SSLError, http.client.HTTPException) as e:
            raise VSphereUnreachable(
                f"{ep.address}: cannot reach the vSphere API: {e}",
                hint="check the address, that port 443 is open from the appliance, and DNS",
            ) from e
        except vmodl.MethodFault as e:
            raise VSphereError(f"{ep.address}: {fault_text(e)}") from e
        except Exception as e:  # SmartStubAdapter raises bare Exception for non-vSphere servers
            raise VSphereUnreachable(
                f"{ep.address}: not a vSphere API endpoint ({e})",
                hint="give the vCenter or ESXi address, not a VAMI/appliance port",
            ) from e
        password = self._password() if callable(self._password) else self._password
        try:
            content.sessionManager.Login(ep.user, password.reveal())
        except vim.fault.InvalidLogin as e:
            log.warning("%s: login as %s refused", ep.address, ep.user)
            raise LoginFailed(ep.address, ep.user) from e
        except vmodl.MethodFault as e:
            raise VSphereError(f"{ep.address}: login failed: {fault_text(e)}") from e
        except (OSError, http.client.HTTPException) as e:
            raise VSphereUnreachable(f"{ep.address}: connection lost during login: {e}") from e
        del password
        self._ctx, self._si, self.content = ctx, si, content
        log.info(
            "%s: logged in as %s (%s, TLS %s)",
            ep.address,
            ep.user,
            content.about.fullName,
            ep.tls.mode,
        )
        return self

    def close(self) -> None:
        if self.content is not None:
            with suppress(Exception):
                self.content.sessionManager.Logout()
            log.info("%s: logged out", self.endpoint.address)
        self._si = self.content = None

    def __enter__(self) -> VSphereClient:
        return self.connect() if self.content is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def keepalive(self) -> None:
        """A cheap call that counts as session activity."""
        self._si.CurrentTime()

    @property
    def about(self) -> dict[str, str]:
        a = self.content.about
        return {"name": a.fullName, "api": a.apiVersion, "type": a.apiType, "uuid": a.instanceUuid}

    def session_cookie(self) -> Secret:
        """'vmware_soap_session="..."' for the datastore HTTP endpoint. A credential."""
        raw = self._si._stub.cookie or ""
        m = re.search(r'vmware_soap_session=("?[^";]+"?)', raw)
        if not m:
            raise VSphereError(f"{self.endpoint.address}: the login returned no session cookie")
        value = m.group(1)
        if not value.startswith('"'):
            value = f'"{value}"'
        return Secret(f"vmware_soap_session={value}")

    def verified_certificate_pem(self) -> str | None:
        """The pinned certificate as verified on this session (for libcurl's cainfo)."""
        if isinstance(self._ctx, vtls.PinnedContext) and self._ctx.presented_der:
            return ssl.DER_cert_to_PEM_cert(self._ctx.presented_der)
        return None

    def data_context(self) -> ssl.SSLContext:
        return vtls.data_path_context(self.endpoint.tls, self.endpoint.address)

    # -- inventory helpers -----------------------------------------------------------------

    def retrieve(
        self, kind: Any, paths: list[str], objects: list[Any] | None = None
    ) -> Iterator[tuple[Any, dict[str, Any]]]:
        """(object, {path: value}) for every object of ``kind`` (or the given objects).

        Unset properties are simply absent: reading them as attributes breaks on vcsim.
        """
        pc = self.content.propertyCollector
        PC = vmodl.query.PropertyCollector
        view = None
        if objects is None:
            view = self.content.viewManager.CreateContainerView(
                self.content.rootFolder, [kind], True
            )
            obj_set = [
                PC.ObjectSpec(
                    obj=view,
                    skip=True,
                    selectSet=[PC.TraversalSpec(path="view", skip=False, type=type(view))],
                )
            ]
        else:
            obj_set = [PC.ObjectSpec(obj=o) for o in objects]
        spec = PC.FilterSpec(objectSet=obj_set, propSet=[PC.PropertySpec(type=kind, pathSet=paths)])
        try:
            result = pc.RetrievePropertiesEx([spec], PC.RetrieveOptions())
            while result is not None:
                for oc in result.objects:
                    yield oc.obj, {p.name: p.val for p in oc.propSet}
                if not result.token:
                    break
                result = pc.ContinueRetrievePropertiesEx(result.token)
        finally:
            if view is not None:
                with suppress(Exception):
                    view.Destroy()

    def props(self, obj: Any, paths: list[str]) -> dict[str, Any]:
        for _, values in self.retrieve(type(obj), paths, [obj]):
            return values
        return {}

    def find_vm(self, ref: str) -> Any:
        """A VM by MoRef ('vm-42') or instance UUID."""
        if re.fullmatch(r"vm-\d+", ref):
            vm = vim.VirtualMachine(ref, self._si._stub)
            try:
                self.props(vm, ["name"])
            except vmodl.fault.ManagedObjectNotFound as e:
                raise VMNotFound(
                    f"VM {ref} not found on {self.endpoint.address}",
                    hint="refresh discovery; the VM may have been removed or re-registered",
                ) from e
            return vm
        vm = self.content.searchIndex.FindByUuid(None, ref, True, True)
        if vm is None:
            raise VMNotFound(
                f"VM {ref} not found on {self.endpoint.address}",
                hint="refresh discovery; the VM may have been removed or re-registered",
            )
        return vm

    def datacenter_of(self, obj: Any) -> str:
        """The inventory path of the datacenter holding ``obj`` ('DC0', 'Folder/DC1')."""
        cur = obj
        while cur is not None and not isinstance(cur, vim.Datacenter):
            cur = self.props(cur, ["parent"]).get("parent")
        if cur is None:
            raise VSphereError(f"no datacenter above {obj} on {self.endpoint.address}")
        names: list[str] = []
        while cur is not None:
            p = self.props(cur, ["name", "parent"])
            if p.get("parent") is None:  # the root folder is not part of the path
                break
            names.append(p["name"])
            cur = p["parent"]
        return "/".join(reversed(names))

    def wait(self, task: Any, what: str, *, timeout: float = TASK_TIMEOUT) -> Any:
        """Wait for a task; return its result or raise TaskFailed naming ``what``."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            p = self.props(task, ["info.state", "info.error", "info.result"])
            state = p.get("info.state")
            if state == "success":
                return p.get("info.result")
            if state == "error":
                err = p.get("info.error")
                failed = TaskFailed(f"{what} failed: {fault_text(err) if err else 'unknown error'}")
                failed.fault = err
                raise failed
            if time.monotonic() > deadline:
                raise TaskFailed(
                    f"{what} did not finish within {timeout:.0f} s",
                    hint="check the task in the vSphere client; it may still be running",
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    @property
    def stub(self) -> Any:
        return self._si._stub
