"""Each screen's main flow, driven by Pilot against a real ferrymand on a seeded temporary
store. Actions reach the daemon through the client; assertions read the widgets and what the
daemon then says (jobs, sources, audit)."""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import DataTable, Input, Select, Static, TextArea

from appliance.client import Client
from tests.datapath_fixtures import NbdkitServer
from tests.helpers.daemon import Env
from tests.helpers.tls import self_signed_tls
from tests.tui.pilot import cells, column, note_titled, notes, text_of, until
from tui.app import FerrymanApp
from tui.screens.dialogs import ConfirmDialog, ThumbprintDialog
from tui.screens.machine import MachineScreen
from tui.screens.protect import ProtectDialog
from tui.screens.source_form import SourceForm
from tui.widgets.common.fields import Field
from tui.widgets.dashboard.machine_table import MachineTable

pytestmark = [pytest.mark.tui, pytest.mark.timeout(180)]
AppFor = Callable[..., FerrymanApp]


def field_error(screen: Any, fid: str) -> str:
    return text_of(screen.query_one(f"#field-{fid}", Field).query_one(".field-error", Static))


# -- dashboard -------------------------------------------------------------------------------


async def test_dashboard_states_in_words_and_sync_now(scene: Env, app_for: AppFor) -> None:
    app = app_for(scene)
    async with app.run_test(size=(160, 40)) as pilot:
        table = app.screen.query_one(MachineTable)
        await until(pilot, lambda: table.row_count == 4, "4 protected machines")
        assert cells(table, "app01")[3] == "✗ 3 failed"
        assert cells(table, "app01")[4] == "✗ OVER 47m/5m"
        assert cells(table, "app01")[7] == "3 failed syncs in a row; over RPO"
        db01 = cells(table, "db01")
        assert db01[3] == "▶ syncing" and db01[4] == "! NEAR 9m/10m"
        assert "45%" in db01[5] and "112M/s" in db01[5] and "50s" in db01[5]
        assert db01[6].strip(), "a throughput sparkline from the sync history"
        assert cells(table, "web01")[4] == "✓ within 4m/15m"
        assert "legacy" not in [str(k.value) for k in table.rows]  # not protected
        summary = text_of(app.screen.query_one("#summary", Static))
        assert "ALERT" in summary and "app01: 3 failed syncs in a row" in summary
        assert app.screen.query_one("#jobs", DataTable).row_count == 2

        table.move_cursor(row=table.get_row_index("web01"))
        await pilot.press("s")
        title = await until(
            pilot, lambda: note_titled(app, "sync of web01 started"), "the job notification"
        )
        assert "goes on if you quit" in title[1]
        with Client(scene.socket, user="test") as c:
            assert any(
                j["kind"] == "sync" and j["params"].get("full") is False for j in c.jobs(limit=5)
            )
        await pilot.press("o")
        await until(pilot, lambda: isinstance(app.screen, MachineScreen), "machine screen")
        assert app.screen.machine_name == "web01"


async def test_daemon_gone_gives_one_notification_with_the_fix(scene: Env, app_for: AppFor) -> None:
    app = app_for(scene)
    async with app.run_test(size=(80, 24)) as pilot:
        table = app.screen.query_one(MachineTable)
        await until(pilot, lambda: table.row_count == 4, "first load")
        scene.daemon.stop()  # type: ignore[attr-defined]
        await pilot.press("r")
        title, body = await until(
            pilot, lambda: note_titled(app, "Refreshing the dashboard failed"), "failure note"
        )
        assert "ferrymand is not answering" in body and "→ start it" in body
        await pilot.press("r")
        await pilot.pause(0.5)
        same = [n for n in app._notifications if n.title == title]
        assert len(same) == 1, "a repeated failure is not shown again"
        assert table.row_count == 4, "the last known state stays on screen"


# -- sources ---------------------------------------------------------------------------------


async def open_form(pilot: Any, app: FerrymanApp) -> SourceForm:
    await pilot.press("2")
    await until(
        pilot, lambda: app.screen.query_one("#sources", DataTable).row_count == 2, "sources loaded"
    )
    await pilot.press("a")
    return await until(
        pilot, lambda: isinstance(app.screen, SourceForm) and app.screen, "the source form"
    )


def fill(form: SourceForm, kind: str, **values: str) -> None:
    form.query_one("#kind", Select).value = kind
    for fid, v in values.items():
        form.query_one(f"#field-{fid}", Field).value = v


async def test_source_form_refuses_bad_input_and_sends_nothing(scene: Env, app_for: AppFor) -> None:
    app = app_for(scene)
    async with app.run_test(size=(100, 30)) as pilot:
        form = await open_form(pilot, app)
        fill(form, "nbd", name="", uri="")
        await pilot.press("ctrl+s")
        assert field_error(form, "name") == "✗ the name is empty: type one"
        assert field_error(form, "uri") == "✗ the address is empty: type one"
        fill(form, "nbd", name="x" * 70, uri="https://10.0.0.1/")
        await pilot.press("ctrl+s")
        assert field_error(form, "name") == "✗ too long: 70 characters, at most 63"
        assert "not a NBD export address: it must start with nbd://" in field_error(form, "uri")
        fill(form, "nbd", name="bad name", uri="nbd://10.0.0.1/")
        await pilot.press("ctrl+s")
        assert "use letters, digits" in field_error(form, "name")
        fill(form, "vsphere", name="vc9", uri="https://vc9.example/", username="", password="")
        await pilot.press("ctrl+s")
        assert "user name is empty" in field_error(form, "username")
        assert "password is empty" in field_error(form, "password")
        with socket.socket() as s:  # bound, never listening: connection refused
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            fill(form, "nbd", name="lab9", uri=f"nbd://127.0.0.1:{port}/disk")
            await pilot.press("ctrl+s")
            err = await until(
                pilot,
                lambda: "unreachable" in field_error(form, "uri") and field_error(form, "uri"),
                "unreachable host",
            )
        assert f"127.0.0.1:{port} is unreachable" in err
        assert "nothing was sent" in text_of(form.query_one("#form-status", Static))
    with Client(scene.socket, user="test") as c:
        assert [s["name"] for s in c.sources()] == ["lab-nbd", "vc01"]
        seeded = 4  # audit rows of the seed; anything sent would add one
        assert not [a for a in c.audit() if a["action"] == "source.add" and a["id"] > seeded]


async def test_add_nbd_source_discover_filter_protect(
    scene: Env, app_for: AppFor, tmp_path: Path
) -> None:
    nbdkit = NbdkitServer(tmp_path, ["memory", "64M"], name="tui").start()
    try:
        app = app_for(scene)
        async with app.run_test(size=(100, 30)) as pilot:
            form = await open_form(pilot, app)
            fill(form, "nbd", name="lab2", uri=nbdkit.uri)
            await pilot.press("ctrl+s")
            await until(pilot, lambda: note_titled(app, "source lab2 saved"), "saved")
            sources = app.screen.query_one("#sources", DataTable)
            await until(pilot, lambda: sources.row_count == 3, "three sources")
            sources.move_cursor(row=sources.get_row_index("lab2"))
            await pilot.press("d")
            machines = app.screen.query_one("#src-machines", DataTable)
            await until(pilot, lambda: machines.row_count == 1, "discovered machine", timeout=60)
            assert note_titled(app, "Discovery done")
            app.screen.query_one("#filter", Input).value = "windows"
            await until(pilot, lambda: machines.row_count == 0, "filtered out")
            app.screen.query_one("#filter", Input).value = "unprotected"
            await until(pilot, lambda: machines.row_count == 1, "filtered in")
            name = str(machines.get_row_at(0)[0])
            machines.focus()
            await pilot.press("p")
            dialog = await until(
                pilot,
                lambda: isinstance(app.screen, ProtectDialog) and app.screen,
                "protect dialog",
            )
            dialog.query_one("#field-rpo", Field).value = "30s"
            await pilot.press("ctrl+s")
            assert "too short" in field_error(dialog, "rpo")
            dialog.query_one("#field-rpo", Field).value = "20m"
            dialog.query_one("#field-throttle", Field).value = "fast"
            await pilot.press("ctrl+s")
            assert "not a rate" in field_error(dialog, "throttle")
            dialog.query_one("#field-throttle", Field).value = "50M"
            await pilot.press("ctrl+s")
            await until(pilot, lambda: not isinstance(app.screen, ProtectDialog), "saved")
        with Client(scene.socket, user="test") as c:
            m = c.machine(name)
            assert m["protected"] and m["rpo_seconds"] == 1200
            assert m["throttle_bps"] == 50 * 1024**2
    finally:
        nbdkit.stop()


async def test_edit_source_checks_every_field_then_saves_through_the_api(
    scene: Env, app_for: AppFor, tmp_path: Path
) -> None:
    a = NbdkitServer(tmp_path, ["memory", "16M"], name="tui-a").start()
    b = NbdkitServer(tmp_path, ["memory", "32M"], name="tui-b").start()
    try:
        with Client(scene.socket, user="test") as c:
            c.add_source("lab3", "nbd", a.uri)
        app = app_for(scene)
        async with app.run_test(size=(100, 34)) as pilot:
            await pilot.press("2")
            sources = app.screen.query_one("#sources", DataTable)
            await until(pilot, lambda: sources.row_count == 3, "sources loaded")
            sources.move_cursor(row=sources.get_row_index("lab3"))
            await pilot.press("e")
            form = await until(
                pilot, lambda: isinstance(app.screen, SourceForm) and app.screen, "edit form"
            )
            assert form.query_one("#kind", Select).disabled, "a source keeps its kind"
            assert form.query_one("#field-uri", Field).value == a.uri
            fill(form, "nbd", name="", uri="https://10.0.0.1/", throttle="fast")
            await pilot.press("ctrl+s")
            assert field_error(form, "name") == "✗ the name is empty: type one"
            assert "not a NBD export address" in field_error(form, "uri")
            assert "'fast' is not a rate" in field_error(form, "throttle")
            fill(form, "nbd", name="y" * 64, uri=a.uri, throttle="1K")
            await pilot.press("ctrl+s")
            assert field_error(form, "name") == "✗ too long: 64 characters, at most 63"
            assert "too low: at least 64K" in field_error(form, "throttle")
            assert field_error(form, "uri") == ""
            gone = f"nbd+unix:///?socket={a.sock}.gone"
            fill(form, "nbd", name="lab3b", uri=gone, throttle="50M")
            await pilot.press("ctrl+s")
            err = await until(
                pilot,
                lambda: "no socket" in field_error(form, "uri") and field_error(form, "uri"),
                "unreachable",
            )
            assert "is the server running?" in err
            assert "nothing was sent" in text_of(form.query_one("#form-status", Static))
            with Client(scene.socket, user="test") as c:
                assert not [x for x in c.audit() if x["action"] == "source.edit"], "nothing sent"
            fill(form, "nbd", name="lab3b", uri=b.uri, throttle="50M")
            await pilot.press("ctrl+s")
            _, body = await until(
                pilot, lambda: note_titled(app, "source lab3b saved"), "saved", timeout=60
            )
            assert body == "changed: name, uri, throttle"
            await until(pilot, lambda: "lab3b" in column(sources, 0), "the new name listed")
        with Client(scene.socket, user="test") as c:
            src = next(x for x in c.sources() if x["name"] == "lab3b")
            assert src["uri"] == b.uri and src["params"]["throttle_bps"] == 50 * 1024**2
            [edit] = [x for x in c.audit() if x["action"] == "source.edit"]
            assert edit["who"] == pwd.getpwuid(os.getuid()).pw_name  # the kernel's word for it
            assert edit["result"] == "changed: name, uri, throttle"
    finally:
        a.stop()
        b.stop()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    with self_signed_tls(tmp_path) as served:
        yield served


async def test_vsphere_first_contact_asks_to_confirm_the_thumbprint(
    scene: Env, app_for: AppFor, tls_server: tuple[int, str]
) -> None:
    port, fingerprint = tls_server
    app = app_for(scene)
    async with app.run_test(size=(100, 34)) as pilot:
        form = await open_form(pilot, app)
        fill(
            form,
            "vsphere",
            name="vc9",
            uri=f"https://127.0.0.1:{port}/sdk",
            username="administrator@vsphere.local",
            password="secret",
        )
        await pilot.press("ctrl+s")
        dialog = await until(
            pilot,
            lambda: (
                isinstance(app.screen, ThumbprintDialog)
                and app.screen.query_one("#no")
                and app.screen
            ),
            "thumbprint confirmation",
            timeout=30,
        )
        shown = text_of(dialog.query_one(".dialog-body", Static))
        pairs = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
        assert pairs in shown and "vc-test.local" in shown
        await pilot.pause(0.3)
        await pilot.click("#no")
        await until(pilot, lambda: app.screen is form, "back in the form")
        assert "not trusted: nothing was sent" in text_of(form.query_one("#form-status", Static))
        # trusting sends it; the daemon's own test then fails (this is no vCenter) and says so
        await pilot.press("ctrl+s")
        dialog = await until(
            pilot,
            lambda: (
                isinstance(app.screen, ThumbprintDialog)
                and app.screen.query_one("#trust")
                and app.screen
            ),
            "asked again",
            timeout=30,
        )
        await pilot.pause(0.3)  # laid out before the click lands
        await pilot.click("#trust")
        await until(
            pilot,
            lambda: "ferrymand refused" in text_of(form.query_one("#form-status", Static)),
            f"the daemon's refusal ({notes(app)})",
            timeout=60,
        )
        assert note_titled(app, "Saving the source failed")
    with Client(scene.socket, user="test") as c:
        assert "vc9" not in [s["name"] for s in c.sources()]
        refused = [a for a in c.audit() if a["action"] == "source.add"]
        assert refused and refused[-1]["result"].startswith("refused")


# -- machine ---------------------------------------------------------------------------------


async def test_machine_screen_chain_and_verify(scene: Env, app_for: AppFor) -> None:
    app = app_for(scene)
    async with app.run_test(size=(120, 40)) as pilot:
        await app.push_screen(MachineScreen("web01"))
        rps = app.screen.query_one("#m-rps", DataTable)
        await until(pilot, lambda: rps.row_count == 6, "six restore points")
        assert column(rps, 0)[0].startswith("▸"), "the newest first, marked"
        assert column(rps, 3)[-1] == "full" and set(column(rps, 3)[:-1]) == {"incr"}
        assert "✓ verified" in column(rps, 6)
        assert app.screen.query_one("#m-disks", DataTable).row_count == 2
        inspect = text_of(app.screen.query_one("#m-inspect", Static))
        assert "Debian GNU/Linux 12" in inspect and "✓ READY (backend builtin)" in inspect
        assert "! open-vm-tools installed → removed at conversion" in inspect
        assert "✓ within" in text_of(app.screen.query_one("#m-head", Static))
        newest = int(column(rps, 0)[0].lstrip("▸ "))
        await pilot.press("v")
        await until(
            pilot,
            lambda: note_titled(app, f"verification of restore point {newest} started"),
            "verify submitted",
        )
        with Client(scene.socket, user="test") as c:
            assert any(
                j["kind"] == "verify" and j["params"]["restore_point"] == newest
                for j in c.jobs(limit=5)
            )
        await pilot.press("escape")
        assert not isinstance(app.screen, MachineScreen)


# -- plans -----------------------------------------------------------------------------------


async def test_plan_editor_validates_live_diffs_and_saves(scene: Env, app_for: AppFor) -> None:
    app = app_for(scene)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("3")
        editor = app.screen.query_one("#pl-text", TextArea)
        problems = app.screen.query_one("#pl-problems", Static)
        await until(pilot, lambda: '"dr-main"' in editor.text, "plan loaded")
        assert "✓ valid, saved as v2" in text_of(problems)
        good = editor.text
        editor.load_text(good.replace('"cpus": 4', '"cpus": "four"'))
        await until(pilot, lambda: "write a whole number" in text_of(problems), "live problem")
        bad_line = next(i for i, ln in enumerate(editor.text.splitlines(), 1) if '"four"' in ln)
        assert f"line {bad_line}:" in text_of(problems)
        await pilot.press("ctrl+s")
        assert note_titled(app, "Plan not saved")
        assert editor.cursor_location[0] == bad_line - 1, "the cursor went to the problem"
        editor.load_text(good.replace('"memory_mib": 4096', '"memory_mib": 6144'))
        await until(pilot, lambda: "not saved yet" in text_of(problems), "valid again")
        await pilot.press("f4")
        diff = text_of(app.screen.query_one("#pl-diff-text", Static))
        assert "Unsaved changes against v2" in diff and '+      "memory_mib": 6144,' in diff
        assert "against v1" in diff and '-      "memory_mib": 8192,' in diff
        await pilot.press("f2")
        ranks = column(app.screen.query_one("#pl-machines", DataTable), 0)
        assert ranks == ["1", "2", "2"]
        await pilot.press("ctrl+s")
        if hasattr(Client, "save_plan"):
            await until(pilot, lambda: note_titled(app, "plan dr-main saved"), "saved")
        else:
            _, body = await until(
                pilot, lambda: note_titled(app, "Saving the plan failed"), "the refusal"
            )
            assert "cannot save plans yet" in body and "issue 6" in body


# -- test runs and cutover -------------------------------------------------------------------


async def test_test_run_timeline_and_rto(scene: Env, app_for: AppFor) -> None:
    app = app_for(scene)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.press("4")
        tl = app.screen.query_one("#tr-timeline", DataTable)
        await until(pilot, lambda: tl.row_count == 3, "timeline rows")
        assert column(tl, 0) == ["db01", "app01", "web01"]  # by rank
        assert column(tl, 2) == ["15m", "23m", "25m"]
        assert column(tl, 3) == ["✓ ready"] * 3
        db01_bar = column(tl, 4)[0]
        assert db01_bar.index("C") < db01_bar.index("B") < db01_bar.index("R")
        assert "RTO 25m" in text_of(app.screen.query_one("#tr-head", Static))
        await pilot.press("r")
        if hasattr(Client, "test_run"):
            await until(pilot, lambda: note_titled(app, "test run of dr-main started"), "run")
        else:
            _, body = await until(
                pilot, lambda: note_titled(app, "Starting the test run failed"), "refusal"
            )
            assert "cannot start test runs yet" in body


async def test_cutover_wizard_clock_and_typed_confirmation(scene: Env, app_for: AppFor) -> None:
    app = app_for(scene)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("5")
        steps = app.screen.query_one("#co-steps", DataTable)
        await until(pilot, lambda: steps.row_count == 7 and "running" in column(steps, 2), "steps")
        assert column(steps, 1) == [
            "preflight",
            "final-delta",
            "stop-source",
            "last-delta",
            "seal",
            "bring-up",
            "commit",
        ]
        assert column(steps, 2) == ["done"] * 5 + ["running", "waiting"]
        assert column(steps, 0) == ["✓"] * 5 + ["▶", "·"]
        assert column(steps, 3)[1] == "21m"
        clock = text_of(app.screen.query_one("#co-clock", Static))
        assert "00:06:00" in clock and "running" in clock
        assert "bring-up is running in ferrymand" in text_of(
            app.screen.query_one("#co-help", Static)
        )
        await pilot.press("n")
        assert note_titled(app, "Nothing to confirm")
        await pilot.press("b")
        dialog = await until(
            pilot,
            lambda: isinstance(app.screen, ConfirmDialog) and app.screen,
            "rollback confirmation",
        )
        dialog.query_one("#word", Input).value = "dr-mian"
        await pilot.click("#yes")
        assert "type exactly dr-main" in text_of(dialog.query_one("#word-error", Static))
        assert isinstance(app.screen, ConfirmDialog), "a wrong word does nothing"
        dialog.query_one("#word", Input).value = "dr-main"
        dialog.query_one("#word", Input).focus()
        await pilot.press("enter")  # in the word field: the same as the button
        # the daemon refuses a rollback while a step runs, and the refusal says so
        _, body = await until(
            pilot,
            lambda: note_titled(app, "Rolling the cutover back failed"),
            f"the daemon's answer ({notes(app)})",
        )
        assert "running" in body or "busy" in body


# -- calculator and events ---------------------------------------------------------------------


async def test_calculator_fields_and_answer(scene: Env, app_for: AppFor) -> None:
    app = app_for(scene)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("6")
        result = app.screen.query_one("#calc-result", Static)
        await until(pilot, lambda: "RPO you can promise" in text_of(result), "answer")
        app.screen.query_one("#field-data", Field).value = "lots"
        await until(pilot, lambda: "fix the field" in text_of(result), "refusal")
        assert "type a size" in field_error(app.screen, "data")
        app.screen.query_one("#field-data", Field).value = "500 GiB"
        app.screen.query_one("#field-link", Field).value = "100 Mbit/s"
        await until(pilot, lambda: "initial full sync" in text_of(result), "answer again")
        # 500 GiB / (100 Mbit/s / 8 x 70 %) = 61 356 s
        assert "initial full sync     17h02m" in text_of(result)


async def test_events_filter_level_and_audit(scene: Env, app_for: AppFor) -> None:
    app = app_for(scene)
    async with app.run_test(size=(120, 30)) as pilot:
        await pilot.press("7")
        ev = app.screen.query_one("#ev-table", DataTable)
        await until(pilot, lambda: ev.row_count == 5, "seeded events")
        app.screen.query_one("#ev-filter", Input).value = "app01"
        await until(pilot, lambda: ev.row_count == 2, "filtered")
        app.screen.query_one("#ev-level", Select).value = "error"
        await until(pilot, lambda: ev.row_count == 1, "errors only")
        assert column(ev, 1) == ["✗ ERROR"] and column(ev, 3) == ["app01"]
        app.screen.query_one("#ev-filter", Input).value = ""
        ev.focus()
        await pilot.press("a")
        au = app.screen.query_one("#au-table", DataTable)
        await until(pilot, lambda: au.row_count == 5, "audit rows")
        # newest first: this session's login (who the kernel says we are), then the seed
        assert column(au, 3)[0] == "login" and column(au, 2)[0] == "console"
        assert column(au, 1)[1] == "bob" and column(au, 2)[1] == "console"
        assert column(au, 5)[2].startswith("✗ refused")
        assert "ssh:10.0.0.9" in column(au, 2)
