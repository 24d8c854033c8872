"""The machine screen's convert preview against a real ferrymand: a real guest (the cached
vmware-like Debian image, served by qemu-nbd) is synced into a restore point; pressing c
inspects it (the preflight verdict shows), then converts it onto a throw-away overlay that the
daemon deletes. The point stays as it was, block for block, and keeps no reader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from appliance.datapath.chain import DiskChain
from appliance.replication import point_name
from tests.helpers.daemon import Env, running_daemon
from tests.helpers.nbdsrc import Export, assert_equal, cli
from tests.tui.conftest import QUIET, make_app
from tests.tui.pilot import note_titled, notes, text_of, until
from tui.screens.machine import MachineScreen

pytestmark = [pytest.mark.tui, pytest.mark.slow, pytest.mark.timeout(2400)]
CONVERT_WAIT_S = 1800  # inspection + conversion under TCG on a loaded 2-core host


async def test_convert_preview_shows_the_verdict_and_the_result(
    fm_env: Env, vmware_like_image: Path, tmp_path: Path
) -> None:
    with running_daemon(fm_env, *QUIET):
        exp = Export(vmware_like_image, tmp_path / "src.sock", fmt="qcow2")
        exp.start()
        try:
            cli(fm_env, "source", "add", "lab", "--kind", "nbd", "--uri", exp.uri)
            cli(fm_env, "source", "edit", "lab", "--param", "name=web01")
            cli(fm_env, "discover", "lab", "--wait")
            cli(fm_env, "protect", "web01")
            cli(fm_env, "sync", "web01", "--wait")
        finally:
            exp.stop()
        rp = cli(fm_env, "points", "web01")[-1]
        point = Path(rp["disks"][0]["path"])
        assert_equal(vmware_like_image, point, fmt="qcow2")
        before = hashlib.sha256(point.read_bytes()).hexdigest()

        app = make_app(fm_env)
        async with app.run_test(size=(120, 40)) as pilot:
            await app.push_screen(MachineScreen("web01"))
            screen = app.screen
            pane = screen.query_one("#m-inspect")
            await until(pilot, lambda: screen.query_one("#m-rps").row_count == 1, "the point")
            assert "No inspection stored yet" in text_of(pane)
            await pilot.press("c")
            await until(pilot, lambda: "… inspecting" in text_of(pane), "inspecting")
            await until(
                pilot,
                lambda: "✓ READY (backend builtin)" in text_of(pane),
                f"the preflight verdict ({notes(app)})",
                timeout=CONVERT_WAIT_S,
            )
            assert "debian" in text_of(pane).lower()
            await pilot.press("c")
            assert note_titled(app, "Convert preview"), "one preview at a time"
            await until(
                pilot,
                lambda: "✓ converts with builtin" in text_of(pane) or "FAILED" in text_of(pane),
                f"the conversion ({notes(app)})",
                timeout=CONVERT_WAIT_S,
            )
            shown = text_of(pane)
            assert "✓ converts with builtin" in shown, shown
            assert "the overlay was deleted" in shown
        jobs = cli(fm_env, "jobs", "--all")
        convert = next(j for j in jobs if j["kind"] == "convert")
        assert convert["params"]["preview"] is True and convert["state"] == "succeeded"
        assert convert["result"]["preview"] is True and convert["result"]["backend"] == "builtin"
        assert not list((fm_env.root / "volumes" / "previews").glob("*")), "the overlay is gone"
        chain = DiskChain(point.parent)
        assert not chain.readers(point_name(int(rp["session_id"]))), "no reader left on the point"
        assert hashlib.sha256(point.read_bytes()).hexdigest() == before, "the point is only read"
