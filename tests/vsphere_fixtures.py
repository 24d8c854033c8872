"""Fixtures for the vSphere source: real vcsim (govmomi's simulator) with real disk images.

vcsim is built offline by images/vcsim/build.sh from Debian's govmomi library and cached under
$FERRYMAN_CACHE/vcsim/. The launcher's CBT layer (images/vcsim/cbt.go) is the only test double:
it answers QueryChangedDiskAreas from the real differences of the datastore files between
snapshots. Everything else is vcsim.

Fixtures (wire into tests/conftest.py with ``from tests.vsphere_fixtures import *``):

- ``vcsim_binary``  (session) path of the built launcher
- ``vsphere_certs`` (session) self-signed certificates: A (served by default), B (another),
  C (names another host)
- ``vcsim_factory`` start more launchers (another certificate, port); all stopped at teardown
- ``vcsim``         a running vcsim with certificate A and a canary password
- ``vsphere_vm``    a powered-on VM "ferry01" with a 128 MiB flat disk of random data
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "images" / "vcsim" / "build.sh"
MiB = 1024 * 1024
DISK_SIZE = 128 * MiB
USER = "ferryman@vsphere.local"

__all__ = [
    "Vcsim",
    "VsphereVm",
    "copy_export",
    "vcsim",
    "vcsim_binary",
    "vcsim_factory",
    "vsphere_certs",
    "vsphere_vm",
]


@pytest.fixture(scope="session")
def vcsim_binary() -> Path:
    if (
        shutil.which("go") is None
        or not Path("/usr/share/gocode/src/github.com/vmware/govmomi/simulator").is_dir()
    ):
        pytest.fail("vcsim needs golang-go and golang-github-vmware-govmomi-dev (scripts/test)")
    r = subprocess.run([str(BUILD)], capture_output=True, text=True, check=False, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"building vcsim failed:\n{r.stderr}")
    return Path(r.stdout.strip().splitlines()[-1])


@dataclass
class Cert:
    cert: Path
    key: Path


def _make_cert(d: Path, name: str, san: str = "IP:127.0.0.1,DNS:localhost") -> Cert:
    c, k = d / f"{name}.pem", d / f"{name}.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(k), "-out", str(c), "-subj", f"/CN=vcsim-{name}",
            "-addext", f"subjectAltName={san}",
            "-addext", "basicConstraints=critical,CA:TRUE",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return Cert(c, k)


@pytest.fixture(scope="session")
def vsphere_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cert]:
    d = tmp_path_factory.mktemp("vsphere-certs")
    return {
        "A": _make_cert(d, "A"),
        "B": _make_cert(d, "B"),
        # C names another host: pinned control-plane works, libcurl's host check must refuse
        "C": _make_cert(d, "C", san="DNS:vcsim.invalid"),
    }


@dataclass
class Vcsim:
    proc: subprocess.Popen[str]
    info: dict[str, Any]
    password: str
    user: str = USER
    workdir: Path = field(default_factory=Path)

    @property
    def host(self) -> str:
        return str(self.info["host"])

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def datastore(self) -> Path:
        return Path(self.info["datastores"]["LocalDS_0"])

    @property
    def sha256(self) -> str:
        h = str(self.info["sha256"]).upper()
        return ":".join(h[i : i + 2] for i in range(0, len(h), 2))

    def admin(self) -> Any:
        """A pyVmomi ServiceInstance for test set-up (not the code under test)."""
        from pyVmomi import SoapStubAdapter, vim

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        stub = SoapStubAdapter(
            host=self.host, port=self.port, version="vim.version.version9", sslContext=ctx
        )
        si = vim.ServiceInstance("ServiceInstance", stub)
        si.content.sessionManager.Login(self.user, self.password)
        return si

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def vcsim_factory(
    vcsim_binary: Path, vsphere_certs: dict[str, Cert], tmp_path: Path
) -> Iterator[Callable[..., Vcsim]]:
    started: list[Vcsim] = []

    def start(cert: str = "A", listen: str = "127.0.0.1:0", password: str | None = None) -> Vcsim:
        n = len(started)
        work = tmp_path / f"vcsim{n}"
        work.mkdir()
        password = password or "canary-" + secrets.token_hex(8)
        pw = work / "password"
        pw.write_text(password)
        pw.chmod(0o600)
        c = vsphere_certs[cert]
        argv = [
            str(vcsim_binary), "-listen", listen, "-cert", str(c.cert), "-key", str(c.key),
            "-username", USER, "-password-file", str(pw),
        ]  # fmt: skip
        with open(work / "vcsim.log", "w") as log:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env={**os.environ, "TMPDIR": str(work)},
            )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            proc.wait(5)
            raise RuntimeError(f"vcsim did not start: {(work / 'vcsim.log').read_text()}")
        v = Vcsim(proc=proc, info=json.loads(line), password=password, workdir=work)
        started.append(v)
        return v

    yield start
    for v in started:
        v.stop()


@pytest.fixture
def vcsim(vcsim_factory: Callable[..., Vcsim]) -> Vcsim:
    return vcsim_factory()


def _wait(task: Any) -> Any:
    """Wait for a task through the property collector (task.info breaks on vcsim)."""
    from pyVmomi import vmodl

    pc = vmodl.query.PropertyCollector
    collector = task._stub and vmodl.query.PropertyCollector("propertyCollector", task._stub)
    spec = pc.FilterSpec(
        objectSet=[pc.ObjectSpec(obj=task)],
        propSet=[
            pc.PropertySpec(type=type(task), pathSet=["info.state", "info.error", "info.result"])
        ],
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        props = {p.name: p.val for p in collector.RetrieveContents([spec])[0].propSet}
        if props.get("info.state") == "success":
            return props.get("info.result")
        if props.get("info.state") == "error":
            raise RuntimeError(f"task failed: {props.get('info.error')}")
        time.sleep(0.05)
    raise TimeoutError("vcsim task did not finish within 60 s")


@dataclass
class VsphereVm:
    vcsim: Vcsim
    name: str
    moref: str
    flat: Path  # the -flat.vmdk inside vcsim's datastore directory
    si: Any

    @property
    def vm(self) -> Any:
        from pyVmomi import vim

        return vim.VirtualMachine(self.moref, self.si._stub)

    def disk(self) -> Any:
        from pyVmomi import vim

        return next(
            d for d in self.vm.config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)
        )

    def flats(self) -> dict[str, Path]:
        """Disk key -> its -flat.vmdk in vcsim's datastore directory."""
        from pyVmomi import vim

        out = {}
        for d in self.vm.config.hardware.device:
            if isinstance(d, vim.vm.device.VirtualDisk):
                rel = d.backing.fileName.split("] ", 1)[1].removesuffix(".vmdk")
                out[str(d.key)] = self.vcsim.datastore / f"{rel}-flat.vmdk"
        return out

    def reconfigure(self, **spec: Any) -> None:
        from pyVmomi import vim

        _wait(self.vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(**spec)))

    def snapshot(self, name: str) -> Any:
        return _wait(
            self.vm.CreateSnapshot_Task(name=name, description="", memory=False, quiesce=False)
        )

    def write(self, offset: int, data: bytes) -> None:
        with open(self.flat, "r+b") as f:
            f.seek(offset)
            f.write(data)


def create_vm(
    v: Vcsim, name: str = "ferry01", size: int = DISK_SIZE, extra_disks: tuple[int, ...] = ()
) -> VsphereVm:
    """A powered-on VM; its first disk has ``size`` bytes, further disks ``extra_disks``."""
    from pyVmomi import vim

    si = v.admin()
    content = si.content
    dc = content.rootFolder.childEntity[0]
    pool = dc.hostFolder.childEntity[0].resourcePool
    dev = vim.vm.device
    ctl = dev.VirtualDeviceSpec(
        operation="add",
        device=dev.VirtualLsiLogicController(key=-100, busNumber=0, sharedBus="noSharing"),
    )
    disk = dev.VirtualDeviceSpec(
        operation="add",
        fileOperation="create",
        device=dev.VirtualDisk(
            key=-101,
            controllerKey=-100,
            unitNumber=0,
            capacityInKB=size // 1024,
            backing=dev.VirtualDisk.FlatVer2BackingInfo(
                fileName=f"[LocalDS_0] {name}/{name}.vmdk", diskMode="persistent"
            ),
        ),
    )
    extra = [
        dev.VirtualDeviceSpec(
            operation="add",
            fileOperation="create",
            device=dev.VirtualDisk(
                key=-110 - i,
                controllerKey=-100,
                unitNumber=1 + i,
                capacityInKB=n // 1024,
                backing=dev.VirtualDisk.FlatVer2BackingInfo(
                    fileName=f"[LocalDS_0] {name}/{name}_{i + 1}.vmdk", diskMode="persistent"
                ),
            ),
        )
        for i, n in enumerate(extra_disks)
    ]
    nic = dev.VirtualDeviceSpec(
        operation="add",
        device=dev.VirtualVmxnet3(
            key=-102,
            addressType="generated",
            backing=dev.VirtualEthernetCard.NetworkBackingInfo(deviceName="VM Network"),
        ),
    )
    spec = vim.vm.ConfigSpec(
        name=name,
        guestId="debian11_64Guest",
        numCPUs=2,
        memoryMB=1024,
        firmware="efi",
        files=vim.vm.FileInfo(vmPathName=f"[LocalDS_0] {name}"),
        deviceChange=[ctl, disk, *extra, nic],
    )
    vm = _wait(dc.vmFolder.CreateVM_Task(config=spec, pool=pool))
    flat = v.datastore / name / f"{name}-flat.vmdk"
    # A real disk image: random data in some regions, holes elsewhere, exactly `size` bytes.
    with open(flat, "wb") as f:
        for off, n in ((0, 16 * MiB), (40 * MiB, 8 * MiB), (size - 4 * MiB, 4 * MiB)):
            f.seek(off)
            f.write(os.urandom(n))
        f.truncate(size)
    for i, n in enumerate(extra_disks):
        with open(v.datastore / name / f"{name}_{i + 1}-flat.vmdk", "wb") as f:
            f.seek(n // 2)
            f.write(os.urandom(n // 4))
            f.truncate(n)
    _wait(vm.PowerOnVM_Task())
    return VsphereVm(vcsim=v, name=name, moref=vm._moId, flat=flat, si=si)


@pytest.fixture
def vsphere_vm(vcsim: Vcsim) -> VsphereVm:
    return create_vm(vcsim)


def copy_export(export: Any, target_uri: str, *, chunk: int = 4 * MiB) -> int:
    """Copy a DiskExport's extents into an NBD target with libnbd; return bytes read.

    A deliberately plain copier for tests: the engine's copier (appliance/datapath) is tested
    on its own; this proves what the export serves and which extents it declares.
    """
    import nbd

    src, dst = nbd.NBD(), nbd.NBD()
    src.connect_uri(export.nbd_uri)
    dst.connect_uri(target_uri)
    read = 0
    try:
        assert src.get_size() == export.disk.size, "export size differs from the disk"
        for e in export.extents():
            if e.zero:
                dst.zero(e.length, e.offset)
                continue
            off = e.offset
            while off < e.end:
                n = min(chunk, e.end - off)
                buf = src.pread(n, off)
                dst.pwrite(buf, off)
                read += n
                off += n
        dst.flush()
    finally:
        src.shutdown()
        dst.shutdown()
    return read
