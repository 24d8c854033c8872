"""vSphere source against real vcsim (plus the CBT layer, the only test double).

Every sync test ends with the proof of shared/reliability.md: the restore point (a qcow2
chain written through qemu-nbd) equals the datastore file bit for bit (qemu-img compare).
"""

# ruff: noqa: F811  (fixtures are imported from tests/vsphere_fixtures.py until conftest registers it)
from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.sources.base import Consistency
from appliance.sources.vsphere import (
    CertificateChanged,
    CertificateUnconfirmed,
    Endpoint,
    LoginFailed,
    PreflightRefused,
    Secret,
    TlsPolicy,
    VSphereSource,
    VSphereSyncSession,
    probe,
)
from tests.vsphere_fixtures import (  # noqa: F401  (fixtures)
    MiB,
    Vcsim,
    VsphereVm,
    copy_export,
    create_vm,
    vcsim,
    vcsim_binary,
    vcsim_factory,
    vsphere_certs,
    vsphere_vm,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

CBT_BLOCK = 64 * 1024  # the launcher's change-tracking granularity (-cbt-block)


def source_for(v: Vcsim, tmp_path: Path, **kw: Any) -> VSphereSource:
    ep = Endpoint(host=v.host, port=v.port, user=v.user, tls=TlsPolicy.pinned(v.sha256))
    return VSphereSource(ep, Secret(v.password), run_dir=tmp_path / "run", **kw)


class Chain:
    """A restore-point chain: base.qcow2 <- rp1.qcow2 <- ..., written through qemu-nbd."""

    def __init__(self, d: Path, size: int) -> None:
        self.dir, self.size, self.points = d, size, []  # type: list[Path]

    def new_point(self) -> Path:
        p = self.dir / f"rp{len(self.points)}.qcow2"
        cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if self.points:
            cmd += ["-b", str(self.points[-1]), "-F", "qcow2"]
        subprocess.run([*cmd, str(p), str(self.size)], check=True)
        self.points.append(p)
        return p

    def write(self, session: VSphereSyncSession) -> tuple[Path, int]:
        """Copy the session's single disk into a new point; return (point, bytes read)."""
        p = self.new_point()
        sock = self.dir / "w.sock"
        w = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "-k", str(sock), "-t", str(p)])
        try:
            for _ in range(200):
                if sock.exists():
                    break
                threading.Event().wait(0.02)
            n = copy_export(session.disks[0], f"nbd+unix:///?socket={sock}")
        finally:
            w.terminate()
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        check = subprocess.run(["qemu-img", "check", "-q", str(p)], check=False)
        assert check.returncode == 0
        return p, n

    def equals(self, raw: Path) -> bool:
        r = subprocess.run(
            [
                "qemu-img",
                "compare",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                str(self.points[-1]),
                str(raw),
            ],
            check=False,
        )
        return r.returncode == 0


def sync(src: VSphereSource, vm: VsphereVm, chain: Chain, token: Any) -> tuple[Any, Any, int]:
    """One sync as the engine runs it: copy, seal (qemu-img check), token, release."""
    s = src.open_session(vm.moref, token)
    try:
        _, n = chain.write(s)
        new_token = s.token()  # after sealing
    finally:
        s.release()
    return s, new_token, n


def vm_snapshots(vm: VsphereVm) -> list[str]:
    from pyVmomi import vmodl

    pc = vmodl.query.PropertyCollector
    spec = pc.FilterSpec(
        objectSet=[pc.ObjectSpec(obj=vm.vm)],
        propSet=[pc.PropertySpec(type=type(vm.vm), pathSet=["snapshot"])],
    )
    res = vm.si.content.propertyCollector.RetrieveContents([spec])
    props = {p.name: p.val for p in res[0].propSet}
    tree = props.get("snapshot")
    return [n.name for n in tree.rootSnapshotList] if tree else []


# -- registration: TLS and login --------------------------------------------------------------


def test_probe_pin_login_and_discovery(vsphere_vm: VsphereVm, tmp_path: Path) -> None:
    v = vsphere_vm.vcsim
    cert = probe(v.host, v.port)
    assert cert.sha256 == v.sha256
    assert not cert.trusted_by_system  # a self-signed cert: the operator must confirm it
    # Without a pin the first contact refuses and shows the fingerprint to confirm.
    ca = VSphereSource(Endpoint(host=v.host, port=v.port, user=v.user), Secret(v.password))
    with pytest.raises(CertificateUnconfirmed) as ei:
        ca.test()
    assert v.sha256 in str(ei.value)

    src = source_for(v, tmp_path)
    src.test()
    about = src.about()
    assert about["type"] == "VirtualCenter" and about["tls"] == "pinned" and about["api"]
    machines = {m.name: m for m in src.discover()}
    m = machines["ferry01"]
    assert m.ref == vsphere_vm.moref
    assert (m.power_state, m.cpus, m.memory_mib, m.firmware) == ("running", 2, 1024, "efi")
    assert m.guest_os == "debian11_64Guest"
    (d,) = m.disks
    assert d.size == 128 * MiB
    assert d.label == "[LocalDS_0] ferry01/ferry01.vmdk"
    assert d.details["mode"] == "persistent" and d.details["backing"] == "flat"
    (nic,) = m.nics
    assert nic["network"] == "VM Network" and nic["mac"].startswith("00:0c:29")
    assert m.details["cbt"] is False and m.details["snapshots"] == []
    assert m.details["tools"] == "guestToolsNotRunning"
    # A VM is found by MoRef or by instance UUID (survives re-registration in vCenter).
    assert src.preflight(m.details["instance_uuid"]).vm == vsphere_vm.moref


def test_wrong_password_is_a_clear_error(vcsim: Vcsim, tmp_path: Path) -> None:
    ep = Endpoint(
        host=vcsim.host, port=vcsim.port, user=vcsim.user, tls=TlsPolicy.pinned(vcsim.sha256)
    )
    with pytest.raises(LoginFailed) as ei:
        VSphereSource(ep, Secret("wrong-canary-xyz")).test()
    assert "ferryman@vsphere.local" in str(ei.value)
    assert "wrong-canary-xyz" not in str(ei.value)
    assert "wrong-canary-xyz" not in repr(ei.value.__cause__)


class RecordingTlsServer:
    """A TLS server with another certificate that records every byte a client sends."""

    def __init__(self, cert: Any) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert.cert, cert.key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.handshakes = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while self.sock.fileno() != -1:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes += 1
                    tls.settimeout(2)
                    while chunk := tls.recv(65536):
                        self.received += chunk
            except (OSError, ssl.SSLError):
                pass

    def close(self) -> None:
        self.sock.close()
        self.thread.join(5)


def test_changed_certificate_refused_before_credentials(
    vcsim: Vcsim, vcsim_factory: Callable[..., Vcsim], vsphere_certs: Any, tmp_path: Path
) -> None:
    # Reliability row 22: a local TLS server with another certificate (a MITM).
    mitm = RecordingTlsServer(vsphere_certs["B"])
    try:
        ep = Endpoint(
            host="127.0.0.1", port=mitm.port, user=vcsim.user, tls=TlsPolicy.pinned(vcsim.sha256)
        )
        with pytest.raises(CertificateChanged) as ei:
            VSphereSource(ep, Secret(vcsim.password)).test()
        presented = probe("127.0.0.1", mitm.port).sha256
        assert ei.value.expected == vcsim.sha256 and ei.value.presented == presented
        assert vcsim.sha256 in str(ei.value) and presented in str(ei.value)
    finally:
        mitm.close()
    assert mitm.handshakes >= 1
    assert mitm.received == b"", "bytes were sent to a server with the wrong certificate"

    # The real vcsim, restarted with another certificate: refused the same way.
    other = vcsim_factory(cert="B", password=vcsim.password)
    ep = Endpoint(
        host=other.host, port=other.port, user=other.user, tls=TlsPolicy.pinned(vcsim.sha256)
    )
    with pytest.raises(CertificateChanged):
        VSphereSource(ep, Secret(other.password)).discover()


# -- protect: preflight and CBT ---------------------------------------------------------------


def test_preflight_refuses_snapshots_independent_disks_unreadable_storage(
    vcsim: Vcsim, tmp_path: Path
) -> None:
    src = source_for(vcsim, tmp_path)
    with_snap = create_vm(vcsim, "snapped", 8 * MiB)
    with_snap.snapshot("before-upgrade")
    with pytest.raises(PreflightRefused) as ei:
        src.protect(with_snap.moref)
    assert "before-upgrade" in str(ei.value) and "snapshot" in str(ei.value)

    indep = create_vm(vcsim, "indep", 8 * MiB)
    from pyVmomi import vim

    disk = indep.disk()
    disk.backing.diskMode = "independent_persistent"
    indep.reconfigure(deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)])
    with pytest.raises(PreflightRefused) as ei:
        src.protect(indep.moref)
    assert "independent_persistent" in str(ei.value) and str(disk.key) in str(ei.value)

    gone = create_vm(vcsim, "gone", 8 * MiB)
    gone.flat.unlink()  # the datastore endpoint cannot serve the disk
    report = src.preflight(gone.moref)
    assert not report.ok
    assert any("cannot be read" in r and "not found" in r for r in report.reasons)

    # Nothing half made: no CBT switched on, no snapshot created by the refusals.
    for m in src.discover():
        if m.name in ("snapped", "indep", "gone"):
            assert m.details["cbt"] is False
    assert vm_snapshots(with_snap) == ["before-upgrade"]
    assert vm_snapshots(indep) == []


def test_protect_enables_cbt_with_snapshot_cycle(vsphere_vm: VsphereVm, tmp_path: Path) -> None:
    src = source_for(vsphere_vm.vcsim, tmp_path)
    res = src.protect(vsphere_vm.moref)
    assert res.report.ok
    assert any("CBT enabled" in e for e in res.events)
    assert any("snapshot created and removed" in e for e in res.events)
    assert vsphere_vm.vm.config.changeTrackingEnabled is True
    assert vsphere_vm.disk().backing.changeId  # CBT is active: the disk carries a changeId
    assert vm_snapshots(vsphere_vm) == []
    assert src.protect(vsphere_vm.moref).events == []  # idempotent


# -- sync -------------------------------------------------------------------------------------


@pytest.fixture
def protected(vsphere_vm: VsphereVm, tmp_path: Path) -> Iterator[tuple[VSphereSource, Chain]]:
    src = source_for(vsphere_vm.vcsim, tmp_path)
    src.protect(vsphere_vm.moref)
    chain_dir = tmp_path / "chain"
    chain_dir.mkdir()
    yield src, Chain(chain_dir, 128 * MiB)
    assert vm_snapshots(vsphere_vm) == [], "a sync left a snapshot behind"
    assert not list((tmp_path / "run").glob("*")), "an nbdkit export was left behind"


def test_full_then_incremental_sync_is_bit_exact(
    vsphere_vm: VsphereVm, protected: tuple[VSphereSource, Chain]
) -> None:
    src, chain = protected
    s1, t1, read1 = sync(src, vsphere_vm, chain, None)
    assert s1.full and "first sync" in s1.reason
    assert s1.consistency is Consistency.CRASH_CONSISTENT  # vcsim VMs run no VMware Tools
    assert any("crash-consistent" in e for e in s1.events)
    assert read1 == 28 * MiB == s1.disks[0].data_bytes  # allocated areas: 16 + 8 + 4 MiB
    assert chain.equals(vsphere_vm.flat)
    key = str(vsphere_vm.disk().key)
    assert t1["disks"][key]["change_id"].endswith("/2")  # protect's stun was /1
    assert t1["snapshot"] == s1.snapshot_id

    # The guest writes between syncs (no snapshot exists: the flat file is the live disk).
    writes = {5 * MiB + 100: os.urandom(3000), 90 * MiB: os.urandom(200 * 1024), 0: b"\0" * 512}
    for off, data in writes.items():
        vsphere_vm.write(off, data)
    s2, t2, read2 = sync(src, vsphere_vm, chain, t1)
    assert not s2.full and s2.reason == ""
    (d2,) = s2.disks
    assert d2.mode == "dirty"
    expected = sorted(
        {
            b * CBT_BLOCK
            for off, data in writes.items()
            for b in range(off // CBT_BLOCK, (off + len(data) - 1) // CBT_BLOCK + 1)
        }
    )
    got = sorted({o for a, n in d2.areas for o in range(a, a + n, CBT_BLOCK)})
    assert got == expected  # exactly the changed blocks, over several QCDA pages
    assert read2 == len(expected) * CBT_BLOCK
    assert chain.equals(vsphere_vm.flat)
    assert t2["disks"][key]["change_id"] != t1["disks"][key]["change_id"]


def test_cbt_reset_and_refused_changeid_lead_to_full_resync(
    vsphere_vm: VsphereVm, protected: tuple[VSphereSource, Chain]
) -> None:
    src, chain = protected
    _, t1, _ = sync(src, vsphere_vm, chain, None)
    key = str(vsphere_vm.disk().key)

    # A changeId vSphere does not know (same epoch, unknown sequence): full, with the reason.
    bogus = {
        **t1,
        "disks": {key: {**t1["disks"][key], "change_id": t1["disks"][key]["change_id"] + "9"}},
    }
    vsphere_vm.write(70 * MiB, os.urandom(4096))
    s2, t2, _ = sync(src, vsphere_vm, chain, bogus)
    assert s2.full and "refused the stored changeId" in s2.reason
    assert chain.equals(vsphere_vm.flat)

    # A token of another VM (instance UUID differs): full, with the reason.
    other = {**t1, "instance_uuid": "00000000-0000-0000-0000-000000000000"}
    s_other, _, _ = sync(src, vsphere_vm, chain, other)
    assert s_other.full and "instance UUID changed" in s_other.reason

    # CBT reset (disabled and enabled again, e.g. by another backup product): new epoch.
    vsphere_vm.reconfigure(changeTrackingEnabled=False)
    src.protect(vsphere_vm.moref)
    vsphere_vm.write(100 * MiB, os.urandom(8192))
    s3, t3, read3 = sync(src, vsphere_vm, chain, t2)
    assert s3.full and "CBT was reset" in s3.reason
    assert read3 >= 28 * MiB
    assert chain.equals(vsphere_vm.flat)

    # And the next one is incremental again.
    vsphere_vm.write(1 * MiB, os.urandom(100))
    s4, _, read4 = sync(src, vsphere_vm, chain, t3)
    assert not s4.full and read4 == CBT_BLOCK
    assert chain.equals(vsphere_vm.flat)


def test_datastore_read_failure_mid_copy_leaves_nothing_half_made(
    vsphere_vm: VsphereVm, protected: tuple[VSphereSource, Chain], tmp_path: Path
) -> None:
    import nbd

    src, chain = protected
    _, t1, _ = sync(src, vsphere_vm, chain, None)
    vsphere_vm.write(2 * MiB, os.urandom(MiB))
    s = src.open_session(vsphere_vm.moref, t1)
    moved = vsphere_vm.flat.with_suffix(".away")
    try:
        h = nbd.NBD()
        h.connect_uri(s.disks[0].nbd_uri)
        assert h.pread(4096, 0)  # reading works ...
        vsphere_vm.flat.rename(moved)  # ... until the datastore loses the file
        with pytest.raises(nbd.Error) as ei:
            h.pread(4096, 2 * MiB)
        assert ei.value.errno is not None
        h.shutdown()
    finally:
        s.release()
        moved.rename(vsphere_vm.flat)
    assert vm_snapshots(vsphere_vm) == []
    # The token was never taken: the next sync repeats the same delta and is exact.
    s2, _, _ = sync(src, vsphere_vm, chain, t1)
    assert not s2.full
    assert chain.equals(vsphere_vm.flat)


def test_secret_canary_never_leaks(
    vsphere_vm: VsphereVm, protected: tuple[VSphereSource, Chain], caplog: pytest.LogCaptureFixture
) -> None:
    # Reliability row 23: the password (a canary) and the session cookie.
    caplog.set_level(logging.DEBUG)
    src, _ = protected
    canary = vsphere_vm.vcsim.password
    assert src.discover()
    s = src.open_session(vsphere_vm.moref, None)
    try:
        cookie = s._client.session_cookie().reveal() if s._client else ""
        assert cookie
        cookie_value = cookie.split("=", 1)[1].strip('"')
        cmdlines = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes())
                except OSError:
                    pass
        assert any(b"nbdkit" in c and b"https_plugin.py" in c for c in cmdlines)
        for c in cmdlines:
            assert canary.encode() not in c and cookie_value.encode() not in c
        workdir = s.disks[0].export.workdir
        assert not (workdir / "cookie").exists()  # shredded once nbdkit read it
        for f in workdir.rglob("*"):
            if f.is_file():
                assert cookie_value not in f.read_text(errors="replace")
    finally:
        s.release()
    ep = src.endpoint
    with pytest.raises(LoginFailed) as ei:
        VSphereSource(ep, Secret(canary + "x")).test()
    import traceback

    tb = "".join(traceback.format_exception(ei.value))  # with the chained pyVmomi fault
    text = caplog.text + tb + repr(ei.value.__cause__) + repr(Secret(canary))
    assert canary not in text and cookie_value not in text
    assert canary not in str(ep.to_dict())


# -- power control ----------------------------------------------------------------------------


def test_power_off_and_on_for_cutover_and_rollback(vsphere_vm: VsphereVm, tmp_path: Path) -> None:
    src = source_for(vsphere_vm.vcsim, tmp_path)
    r = src.stop_machine(vsphere_vm.moref, timeout=30)
    assert r.action == "power-off" and "Tools not running" in r.note  # no Tools in vcsim
    assert vsphere_vm.vm.runtime.powerState == "poweredOff"
    assert src.stop_machine(vsphere_vm.moref).action == "already-off"
    assert src.start_machine(vsphere_vm.moref).action == "power-on"
    assert vsphere_vm.vm.runtime.powerState == "poweredOn"


def test_disk_resized_leads_to_full_resync(
    vsphere_vm: VsphereVm, protected: tuple[VSphereSource, Chain]
) -> None:
    from pyVmomi import vim

    src, chain = protected
    _, t1, _ = sync(src, vsphere_vm, chain, None)
    new_size = 160 * MiB
    disk = vsphere_vm.disk()
    disk.capacityInKB = new_size // 1024
    disk.capacityInBytes = new_size
    vsphere_vm.reconfigure(
        deviceChange=[vim.vm.device.VirtualDeviceSpec(operation="edit", device=disk)]
    )
    with open(vsphere_vm.flat, "r+b") as f:  # the guest's new space, partly written
        f.truncate(new_size)
        f.seek(150 * MiB)
        f.write(os.urandom(MiB))
    chain.size = new_size
    s2, t2, _ = sync(src, vsphere_vm, chain, t1)
    assert s2.full and f"resized from {128 * MiB} to {new_size}" in s2.reason
    assert s2.disks[0].disk.size == new_size
    assert chain.equals(vsphere_vm.flat)
    assert t2["disks"][str(disk.key)]["size"] == new_size


def test_stale_ferryman_snapshot_is_removed_with_an_event(
    vsphere_vm: VsphereVm, protected: tuple[VSphereSource, Chain]
) -> None:
    src, chain = protected
    vsphere_vm.snapshot("ferryman-sync-20260101T000000Z")  # left by a killed sync
    s, _, _ = sync(src, vsphere_vm, chain, None)
    assert any("ferryman-sync-20260101T000000Z" in e and "interrupted" in e for e in s.events)
    assert chain.equals(vsphere_vm.flat)


def test_transient_datastore_failure_is_retried(
    vsphere_vm: VsphereVm, protected: tuple[VSphereSource, Chain]
) -> None:
    # Reliability row 1 on this source: the datastore endpoint fails for a moment (here the
    # file is away for 1 s); nbdkit's retry filter reopens and the read succeeds.
    import nbd

    src, _ = protected
    s = src.open_session(vsphere_vm.moref, None)
    moved = vsphere_vm.flat.with_suffix(".away")
    try:
        h = nbd.NBD()
        h.connect_uri(s.disks[0].nbd_uri)
        vsphere_vm.flat.rename(moved)
        back = threading.Timer(1.0, moved.rename, args=(vsphere_vm.flat,))
        back.start()
        t0 = time.monotonic()
        data = h.pread(MiB, 40 * MiB)
        waited = time.monotonic() - t0
        back.join()
        h.shutdown()
    finally:
        s.release()
        if moved.exists():
            moved.rename(vsphere_vm.flat)
    with open(vsphere_vm.flat, "rb") as f:
        f.seek(40 * MiB)
        assert data == f.read(MiB)
    assert waited >= 1.0  # the first attempt failed: the read waited for the retry


def test_session_keepalive_runs_during_copy_and_stops_at_release(
    vsphere_vm: VsphereVm, protected: tuple[VSphereSource, Chain], caplog: pytest.LogCaptureFixture
) -> None:
    src, _ = protected
    src.keepalive = 0.05
    s = src.open_session(vsphere_vm.moref, None)
    try:
        thread = s._keepalive
        assert thread is not None and thread.is_alive()
        time.sleep(0.5)  # ~10 keep-alive calls against vcsim
    finally:
        s.release()
    assert not thread.is_alive()
    assert "keep-alive failed" not in caplog.text


def test_ca_mode_insecure_mode_and_a_pinned_certificate_for_another_host(
    vsphere_vm: VsphereVm, vcsim_factory: Callable[..., Vcsim], vsphere_certs: Any, tmp_path: Path
) -> None:
    v = vsphere_vm.vcsim
    # "ca" with an enterprise CA bundle: verified chain AND host name on both paths.
    ca = TlsPolicy(mode="ca", cafile=str(vsphere_certs["A"].cert))
    for host in ("127.0.0.1", "localhost"):
        src = VSphereSource(
            Endpoint(host=host, port=v.port, user=v.user, tls=ca),
            Secret(v.password),
            run_dir=tmp_path / "run",
        )
        assert src.preflight(vsphere_vm.moref).ok
    # ... and a sync through nbdkit's curl plugin (libcurl verifies chain and host name).
    chain_dir = tmp_path / "chain1"
    chain_dir.mkdir()
    chain = Chain(chain_dir, 128 * MiB)
    s1, t1, _ = sync(src, vsphere_vm, chain, None)
    assert "curl" in s1.disks[0].export.argv  # type: ignore[attr-defined]
    vsphere_vm.write(77 * MiB, os.urandom(1000))
    sync(src, vsphere_vm, chain, t1)
    assert chain.equals(vsphere_vm.flat)
    # insecure: only when asked for; works, and says so in the stored endpoint.
    ep = Endpoint(host=v.host, port=v.port, user=v.user, tls=TlsPolicy(mode="insecure"))
    assert ep.to_dict()["tls"]["mode"] == "insecure"
    assert VSphereSource(ep, Secret(v.password)).preflight(vsphere_vm.moref).ok

    # A server whose certificate names another host (ESXi's "localhost.localdomain"): trusted
    # through CAs it is refused with the reason; pinned, both paths work (the pinned reader
    # checks the fingerprint, not the name), and the sync is exact.
    other = vcsim_factory(cert="C")
    vm2 = create_vm(other, "ferry02", 8 * MiB)
    by_ca = TlsPolicy(mode="ca", cafile=str(vsphere_certs["C"].cert))
    with pytest.raises(CertificateUnconfirmed, match="certificate not trusted"):
        VSphereSource(
            Endpoint(host=other.host, port=other.port, user=other.user, tls=by_ca),
            Secret(other.password),
        ).test()
    src = source_for(other, tmp_path)
    assert src.preflight(vm2.moref).ok
    chain_dir = tmp_path / "chain2"
    chain_dir.mkdir()
    chain = Chain(chain_dir, 8 * MiB)
    sync(src, vm2, chain, None)
    assert chain.equals(vm2.flat)
    assert vm_snapshots(vm2) == []


def test_cutover_last_delta_after_the_source_is_stopped(
    vsphere_vm: VsphereVm, protected: tuple[VSphereSource, Chain]
) -> None:
    src, chain = protected
    _, t1, _ = sync(src, vsphere_vm, chain, None)  # while it runs
    vsphere_vm.write(33 * MiB, os.urandom(70 * 1024))  # the last writes before shutdown
    assert src.stop_machine(vsphere_vm.moref, timeout=30).action == "power-off"
    s2, _, read2 = sync(src, vsphere_vm, chain, t1)
    assert not s2.full and read2 == 2 * CBT_BLOCK
    assert s2.consistency is Consistency.QUIESCED
    assert any("powered off" in e for e in s2.events)
    assert chain.equals(vsphere_vm.flat)
    assert src.start_machine(vsphere_vm.moref).action == "power-on"  # rollback


def test_sync_of_an_unprotected_vm_turns_cbt_on_with_an_event(
    vsphere_vm: VsphereVm, tmp_path: Path
) -> None:
    src = source_for(vsphere_vm.vcsim, tmp_path)
    chain_dir = tmp_path / "chain"
    chain_dir.mkdir()
    chain = Chain(chain_dir, 128 * MiB)
    s1, t1, _ = sync(src, vsphere_vm, chain, None)
    assert any("CBT enabled" in e for e in s1.events) and s1.full
    vsphere_vm.write(60 * MiB, os.urandom(10))
    s2, _, read2 = sync(src, vsphere_vm, chain, t1)
    assert not s2.full and read2 == CBT_BLOCK
    assert chain.equals(vsphere_vm.flat)
    assert vm_snapshots(vsphere_vm) == []


def test_pinned_reader_refuses_a_changed_certificate_before_sending_the_cookie(
    vcsim: Vcsim, vsphere_certs: Any, tmp_path: Path
) -> None:
    # Reliability row 22 on the data path: the reader meets another certificate.
    import nbd

    from appliance.sources.vsphere import reader

    mitm = RecordingTlsServer(vsphere_certs["B"])
    url = reader.folder_url("127.0.0.1", mitm.port, "DC0", "LocalDS_0", "x/x-flat.vmdk")
    e = reader.pinned_export(
        label="mitm",
        url=url,
        size=MiB,
        cookie=Secret('vmware_soap_session="cookie-canary"'),
        sha256=vcsim.sha256,
        run_dir=tmp_path / "run",
    )
    try:
        e.start()
        h = nbd.NBD()
        h.connect_uri(e.uri)
        with pytest.raises(nbd.Error):
            h.pread(4096, 0)
        h.shutdown()
        log = e.log_path.read_text()
    finally:
        e.close()
        mitm.close()
    assert (
        "certificate of 127.0.0.1 changed" in log and vcsim.sha256.replace(":", "").lower() in log
    )
    assert mitm.handshakes >= 1
    assert mitm.received == b"", "the reader sent bytes to a server with the wrong certificate"


def test_a_killed_reader_is_restarted_on_the_same_socket(
    vsphere_vm: VsphereVm, protected: tuple[VSphereSource, Chain]
) -> None:
    # Reliability row 3 on this source: the reader (nbdkit) dies mid-sync; the session's
    # watch thread starts it again on the same socket, so the copier's reconnect succeeds.
    import signal

    import nbd

    src, _ = protected
    s = src.open_session(vsphere_vm.moref, None)
    try:
        export = s.disks[0].export  # type: ignore[attr-defined]
        assert export.proc is not None
        os.kill(export.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while export.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert export.restarts == 1 and export.alive()
        h = nbd.NBD()
        h.connect_uri(s.disks[0].nbd_uri)
        data = h.pread(MiB, 40 * MiB)
        h.shutdown()
        assert any("reader restarted" in e for e in s.events)
        assert not (export.workdir / "cookie").exists()  # shredded again after the restart
    finally:
        s.release()
    with open(vsphere_vm.flat, "rb") as f:
        f.seek(40 * MiB)
        assert data == f.read(MiB)


def test_parallel_reads_on_one_connection_return_the_right_bytes(
    vsphere_vm: VsphereVm, protected: tuple[VSphereSource, Chain], tmp_path: Path
) -> None:
    # The copier keeps many requests in flight on one NBD connection; the pinned reader must
    # never let two of them share an HTTPS connection. nbdcopy with 32 requests in flight.
    src, _ = protected
    with open(vsphere_vm.flat, "r+b") as f:  # every block different: a mix-up cannot hide
        f.write(os.urandom(128 * MiB))
    s = src.open_session(vsphere_vm.moref, None)
    out = tmp_path / "out.raw"
    try:
        subprocess.run(
            ["nbdcopy", "--connections=1", "--requests=32", "--request-size=262144",
             s.disks[0].nbd_uri, str(out)],
            check=True,
            timeout=120,
        )  # fmt: skip
    finally:
        s.release()
    assert (
        subprocess.run(["cmp", "-s", str(out), str(vsphere_vm.flat)], check=False).returncode == 0
    )
