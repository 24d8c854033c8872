"""Rows 6 and 7: block status missing or failing; odd block sizes."""

from __future__ import annotations

import json
import subprocess

import nbd
import pytest

from appliance.datapath.copier import connect
from appliance.datapath.hashing import verify
from appliance.datapath.writer import QemuNbd
from appliance.replication import sync_disks
from appliance.sources.nbd import NbdSource
from tests.datapath_fixtures import *  # noqa: F403
from tests.datapath_fixtures import MiB, check_ok, images_equal

pytestmark = [pytest.mark.reliability, pytest.mark.integration, pytest.mark.timeout(120)]

SIZE = 32 * MiB


def _sync(uri, chain, sock, **kw):
    src = NbdSource({"disks": {"vda": uri}})
    session = src.open_session(src.ref(), None)
    res = sync_disks(session, {"vda": chain}, point_name="p1", socket_dir=sock, **kw)
    return session, res[0]


def _data_bytes(path):
    out = subprocess.run(
        ["qemu-img", "map", "--output=json", "-f", "qcow2", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(e["length"] for e in json.loads(out) if e["data"])


@pytest.mark.parametrize(
    "filt",
    [
        ["--filter=noextents"],
        ["--filter=error", "error-extents-rate=100%"],
    ],
    ids=["noextents", "extents-fail"],
)
def test_row_06_no_block_status_still_correct_and_sparse(
    filt, nbdkit_server, make_chain, dp_sock_dir
):
    srv = nbdkit_server(
        *filt[:1], "sparse-random", f"size={SIZE}", "percent=20", "seed=61", *filt[1:]
    )
    chain = make_chain("vda")
    session, res = _sync(srv.uri, chain, dp_sock_dir)
    st = res.stats
    if "--filter=error" in filt:
        assert "block status failed" in " ".join(session.disks[0].notes)
    # Everything was read (treated as data) ...
    assert st.bytes_read == SIZE
    # ... but blocks that read as zeroes went out as zero requests, not data.
    assert st.bytes_zeroed > SIZE // 2 and st.bytes_written < SIZE // 2
    p = chain.path_of("p1")
    assert _data_bytes(p) == st.bytes_written  # zeroes stay zero (unallocated)
    # qemu-img compare would trip over the failing block status itself: compare by hashes.
    with QemuNbd(p, dp_sock_dir, read_only=True) as rd:
        assert verify(srv.uri, rd.uri, disk="vda").ok
    assert check_ok(p) in (0, 3)


def test_row_07_blocksize_filter_odd_sizes(nbdkit_server, make_chain, dp_sock_dir):
    # A server that takes 4 KiB-aligned requests of at most 256 KiB.
    srv = nbdkit_server(
        "--filter=blocksize",
        "sparse-random",
        f"size={SIZE}",
        "percent=50",
        "seed=71",
        "minblock=4096",
        "maxdata=262144",
        "maxlen=262144",
    )
    chain = make_chain("vda")
    _, res = _sync(srv.uri, chain, dp_sock_dir, hash_manifest=False)
    h = connect(srv.uri)
    advertised = h.get_block_size(nbd.SIZE_MAXIMUM) or 32 * MiB
    del h
    assert res.stats.request_size <= advertised and res.stats.request_size % 4096 == 0
    p = chain.path_of("p1")
    assert images_equal(srv.uri, p, fb="qcow2").returncode == 0
    assert check_ok(p) in (0, 3)


def test_row_07_request_over_the_maximum_would_fail(nbdkit_server, make_chain, dp_sock_dir):
    """blocksize-policy in error mode refuses any request over 64 KiB or not 4 KiB aligned:
    the sync still succeeds, so none was sent."""
    srv = nbdkit_server(
        "--filter=blocksize-policy",
        "sparse-random",
        f"size={SIZE}",
        "percent=50",
        "seed=72",
        "blocksize-minimum=4096",
        "blocksize-preferred=65536",
        "blocksize-maximum=65536",
        "blocksize-error-policy=error",
    )
    chain = make_chain("vda")
    _, res = _sync(srv.uri, chain, dp_sock_dir)
    assert res.stats.request_size == 65536
    p = chain.path_of("p1")
    assert images_equal(srv.uri, p, fb="qcow2").returncode == 0
    assert check_ok(p) in (0, 3)
