"""Restore-point chains: retention merge with readers, crash in the middle of a merge,
debris cleanup. Each point is checked against the source state it was taken from."""

from __future__ import annotations

import pytest

from appliance.datapath.chain import DiskChain
from appliance.datapath.errors import ChainError, ReaderBusy
from appliance.datapath.hashing import hash_export
from appliance.datapath.writer import QemuNbd
from appliance.replication import sync_disks
from appliance.sources.nbd import NbdSource
from tests.datapath_fixtures import *  # noqa: F403
from tests.datapath_fixtures import MiB, check_ok, write_chunks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SIZE = 16 * MiB


def _point_digest(chain: DiskChain, name: str, sock) -> str:
    with QemuNbd(chain.path_of(name), sock, read_only=True) as rd:
        return hash_export(rd.uri).digest()


@pytest.fixture
def three_points(make_image, qemu_nbd_server, make_chain, dp_sock_dir):
    """p1 <- p2 <- p3 from three states of one raw image; returns (chain, {point: digest})."""
    img = make_image("src.raw", SIZE, [(0, 4 * MiB, 1)])
    chain = make_chain("vda")
    states = {}
    token = None
    for i, name in enumerate(["p1", "p2", "p3"]):
        if i:
            write_chunks(img, [(i * 3 * MiB, MiB, 10 + i), (12 * MiB, 512 * 1024, 20 + i)])
        q = qemu_nbd_server(img, read_only=True, fmt="raw")
        src = NbdSource({"disks": {"vda": q.uri}})
        s = src.open_session(src.ref(), token)
        sync_disks(s, {"vda": chain}, point_name=name, socket_dir=dp_sock_dir)
        token = s.token()
        states[name] = hash_export(q.uri).digest()
        q.stop()
    for name, digest in states.items():
        assert _point_digest(chain, name, dp_sock_dir) == digest
    return chain, states


def test_merge_oldest_keeps_every_later_point_equal(three_points, dp_sock_dir):
    chain, states = three_points
    dropped = chain.merge_oldest()
    assert dropped.name == "p1"
    assert [p.name for p in chain.points()] == ["p2", "p3"]
    assert chain.points()[0].parent is None and chain.points()[1].parent == "p2"
    for name in ("p2", "p3"):
        assert _point_digest(chain, name, dp_sock_dir) == states[name]
        assert check_ok(chain.path_of(name)) in (0, 3)
        assert not (chain.path_of(name).stat().st_mode & 0o222)  # still read-only
    # Only the listed files (+ manifests) remain: the old p2 file is gone.
    qcow2 = sorted(f.name for f in chain.dir.glob("*.qcow2"))
    assert qcow2 == sorted(p.file for p in chain.points())
    chain.merge_oldest()
    assert [p.name for p in chain.points()] == ["p3"]
    assert _point_digest(chain, "p3", dp_sock_dir) == states["p3"]
    with pytest.raises(ChainError):
        chain.merge_oldest()


def test_merge_refused_while_a_reader_holds_the_point(three_points, dp_sock_dir):
    chain, states = three_points
    # A test-run overlay on p2 (persistent reader without pid) blocks merging p1 into p2.
    rid = chain.add_reader("p2", "test run 7")
    with pytest.raises(ReaderBusy, match="test run 7"):
        chain.merge_oldest()
    assert [p.name for p in chain.points()] == ["p1", "p2", "p3"]
    chain.remove_reader("p2", rid)
    # A reader whose process died is stale and ignored.
    chain.add_reader("p1", "verify", pid=2**22 + 12345)
    chain.merge_oldest()
    assert [p.name for p in chain.points()] == ["p2", "p3"]
    assert _point_digest(chain, "p3", dp_sock_dir) == states["p3"]


def test_merge_interrupted_is_finished_by_recover(three_points, dp_sock_dir):
    chain, states = three_points
    # Simulate a crash after the point was marked merging and the commit ran, before the
    # manifest was rewritten: recover() redoes the idempotent steps.
    pts = chain.points()
    pts[0].state = "merging"
    chain._save(pts)
    assert [p.name for p in chain.sealed()] == ["p2", "p3"]
    done = chain.recover()
    assert any("finished merge" in d for d in done)
    assert [p.name for p in chain.points()] == ["p2", "p3"]
    for name in ("p2", "p3"):
        assert _point_digest(chain, name, dp_sock_dir) == states[name]
        assert check_ok(chain.path_of(name)) in (0, 3)


def test_recover_removes_debris_and_delete_newest(three_points, dp_sock_dir):
    chain, states = three_points
    junk = chain.dir / "orphan.qcow2"
    junk.write_bytes(b"x")
    (chain.dir / ".chain.json.abc.tmp").write_text("{}")
    out = chain.recover()
    assert not junk.exists() and any("orphan.qcow2" in o for o in out)
    gone = chain.delete_newest()
    assert gone.name == "p3" and not (chain.dir / gone.file).exists()
    assert _point_digest(chain, "p2", dp_sock_dir) == states["p2"]
