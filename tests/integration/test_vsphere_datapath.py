"""vSphere source through the engine's data path (appliance/datapath): the libnbd copier,
qemu-nbd writer and sealed qcow2 restore points, full then incremental, each verified against
the source snapshot while it exists and compared bit for bit with vcsim's datastore file."""

# ruff: noqa: F811  (fixtures are imported from tests/vsphere_fixtures.py)
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from appliance.datapath.chain import DiskChain
from appliance.replication import sync_disks
from appliance.sources.vsphere import Endpoint, Secret, TlsPolicy, VSphereSource
from tests.vsphere_fixtures import (  # noqa: F401
    MiB,
    Vcsim,
    VsphereVm,
    create_vm,
    vcsim,
    vcsim_binary,
    vcsim_factory,
    vsphere_certs,
    vsphere_vm,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def same(point: Path, raw: Path) -> bool:
    r = subprocess.run(
        ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", str(point), str(raw)],
        check=False,
    )
    return r.returncode == 0


def test_full_then_incremental_restore_points_equal_the_datastore_file(
    vsphere_vm: VsphereVm, tmp_path: Path
) -> None:
    v = vsphere_vm.vcsim
    src = VSphereSource(
        Endpoint(host=v.host, port=v.port, user=v.user, tls=TlsPolicy.pinned(v.sha256)),
        Secret(v.password),
        run_dir=tmp_path / "run",
    )
    src.protect(vsphere_vm.moref)
    key = str(vsphere_vm.disk().key)
    chain = DiskChain(tmp_path / "chain" / key)
    socks = tmp_path / "socks"
    socks.mkdir()

    token = None
    stats = []
    for n in range(3):
        if n:  # the guest writes between syncs
            vsphere_vm.write(n * 7 * MiB + 12345, os.urandom(300 * 1024))
            vsphere_vm.write(127 * MiB, b"\0" * 65536)  # zeroes over data
        s = src.open_session(vsphere_vm.moref, token)
        try:
            (res,) = sync_disks(
                s, {key: chain}, point_name=f"rp{n}", socket_dir=socks, verify_after=True
            )
            assert res.verify is not None and res.verify["mismatch_count"] == 0
            token = s.token()  # persisted only after the point is sealed
        finally:
            s.release()
        assert s.full == (n == 0)
        assert ("first sync" in " ".join(res.notes)) == (n == 0)
        assert res.point is not None
        stats.append(res.stats)
        assert same(chain.path_of(res.point), vsphere_vm.flat)
    assert [p.state for p in chain.points()] == ["sealed"] * 3
    block = 64 * 1024  # the CBT layer's granularity

    def blocks(off: int, n: int) -> int:
        return (off + n - 1) // block - off // block + 1

    # First sync: only the allocated 28 MiB are read. Incrementals: only CBT's blocks; the
    # zeroed block (sync 1 only: in sync 2 it is unchanged) is detected in the read data and
    # written as a zero request.
    assert stats[0].bytes_read == 28 * MiB
    assert stats[1].bytes_read == (blocks(7 * MiB + 12345, 300 * 1024) + 1) * block
    assert stats[1].bytes_zeroed >= block
    assert stats[1].bytes_written == stats[1].bytes_read - block
    assert stats[2].bytes_read == blocks(14 * MiB + 12345, 300 * 1024) * block


def test_two_disks_one_snapshot_one_restore_point(vcsim: Vcsim, tmp_path: Path) -> None:
    vm = create_vm(vcsim, "multi", 32 * MiB, extra_disks=(16 * MiB,))
    src = VSphereSource(
        Endpoint(
            host=vcsim.host, port=vcsim.port, user=vcsim.user, tls=TlsPolicy.pinned(vcsim.sha256)
        ),
        Secret(vcsim.password),
        run_dir=tmp_path / "run",
    )
    src.protect(vm.moref)
    flats = vm.flats()
    assert len(flats) == 2
    chains = {k: DiskChain(tmp_path / "chain" / k) for k in flats}
    socks = tmp_path / "socks"
    socks.mkdir()
    token = None
    for n in range(2):
        if n:
            for f in flats.values():
                with open(f, "r+b") as fh:
                    fh.seek(3 * MiB)
                    fh.write(os.urandom(5000))
        s = src.open_session(vm.moref, token)
        try:
            assert {e.disk.key for e in s.disks} == set(flats)
            results = sync_disks(s, chains, point_name=f"rp{n}", socket_dir=socks)
            token = s.token()
        finally:
            s.release()
        assert s.full == (n == 0)
        for res in results:
            assert res.point is not None
            assert res.point.snapshot_id == s.snapshot_id  # both disks from ONE snapshot
            assert same(chains[res.disk_key].path_of(res.point), flats[res.disk_key])
        if n:
            assert all(r.stats.bytes_read == 64 * 1024 for r in results)
