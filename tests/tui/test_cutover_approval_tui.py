"""The cutover wizard with the two-operator rule: a cutover alice opened shows "waiting for
approval by a second operator"; n opens the approval, which takes the typed plan name, and
the daemon records who approved (here root, the TUI's account: not alice)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Any

from textual.widgets import Input, Static

from tests.helpers.daemon import Env
from tests.tui.pilot import note_titled, notes, text_of, until
from tui.screens.dialogs import ConfirmDialog

AppFor = Callable[..., Any]


def _pending_cutover(env: Env) -> int:
    con = sqlite3.connect(env.db)
    rid = int(con.execute("SELECT id FROM plan_runs WHERE kind='cutover'").fetchone()[0])
    rep = {
        "mode": "guided",
        "next": "final-delta",
        "steps": [{"step": "preflight", "state": "done", "seconds": 0.0, "by": "alice"}],
        "approval": {
            "required": True,
            "requested_by": "alice",
            "approved_by": None,
            "approved_at": None,
        },
    }
    with con:
        con.execute(
            "UPDATE plan_runs SET state='awaiting', step='preflight', report=? WHERE id=?",
            [json.dumps(rep), rid],
        )
    con.close()
    return rid


async def test_cutover_wizard_waits_for_and_takes_a_second_operators_approval(
    scene: Env, app_for: AppFor
) -> None:
    rid = _pending_cutover(scene)
    app = app_for(scene)
    async with app.run_test(size=(100, 30)) as pilot:
        await pilot.press("5")
        help_ = app.screen.query_one("#co-help", Static)
        await until(
            pilot,
            lambda: (
                "waiting for approval by a second operator (requested by alice)" in text_of(help_)
            ),
            "the waiting line",
        )
        await pilot.press("n")
        dialog = await until(
            pilot, lambda: isinstance(app.screen, ConfirmDialog) and app.screen, "approval dialog"
        )
        dialog.query_one("#word", Input).value = "dr-main"
        dialog.query_one("#word", Input).focus()
        await pilot.press("enter")
        await until(
            pilot,
            lambda: note_titled(app, f"cutover {rid} approved by root"),
            f"the approval ({notes(app)})",
        )
    with scene.client() as c:
        run = c.cutover_status(rid)
    assert run["approval"]["approved_by"] == "root"
    assert run["confirm"] == f"ferryman cutover confirm {rid} final-delta"
