"""The TUI's pure parts: formatting, the calculator, plan validation with positions,
timelines and dashboard rows. No screen, no daemon."""

from __future__ import annotations

import json
import socket
from datetime import timedelta

import pytest

from tests.tui.seed import NOW, ts
from tui import calc
from tui import format as fmt
from tui import plan_schema as ps
from tui.screens.protect import parse_rpo, parse_throttle
from tui.services import reachability
from tui.widgets.dashboard.machine_table import machine_state, row_cells
from tui.widgets.plans.timeline import cutover_steps, downtime_s, next_step, timeline_rows

GiB = 1024**3


def test_words_and_symbols_carry_the_state() -> None:
    assert fmt.rpo_words("over", 47 * 60, 300) == "✗ OVER 47m/5m"
    assert fmt.rpo_words("near", 9 * 60, 600) == "! NEAR 9m/10m"
    assert fmt.rpo_words("within", 4 * 60, 900) == "✓ within 4m/15m"
    assert fmt.rpo_words("over", None, 3600) == "✗ OVER never/1h"
    assert fmt.job_state("failed") == "✗ FAILED"
    assert fmt.duration(125) == "2m05s" and fmt.duration(7500) == "2h05m"
    assert fmt.bar(0.5, 8) == "████░░░░" and fmt.bar(0.55, 10) == "█████▌░░░░"
    assert fmt.sparkline([1, 2, 4, 8], 6) == "  ▁▂▄█"
    assert fmt.rate(112 * 1024**2) == "112M/s"


def test_dashboard_row_narrow_and_wide() -> None:
    m = {
        "name": "db01",
        "source": "vc01",
        "guest_os": "rhel 9",
        "protected": True,
        "rpo_seconds": 600,
        "newest_rp": {"source_time": ts(9)},
        "failed_syncs": 0,
        "active_job": {
            "id": 3,
            "kind": "sync",
            "state": "running",
            "progress": {"done": 45, "total": 100, "rate": 112 * 1024**2, "eta_s": 50},
        },
    }
    narrow = row_cells(m, NOW, [1.0, 2.0], wide=False)
    assert narrow[:3] == ("db01", "▶ syncing", "! NEAR 9m/10m")
    assert "45%" in narrow[3] and "112M/s" in narrow[3] and "50s" in narrow[3]
    wide = row_cells(m, NOW, [1.0, 2.0], wide=True)
    assert wide[1] == "vc01" and wide[-1] == "-"
    failing = {**m, "active_job": None, "failed_syncs": 3}
    assert machine_state(failing) == "✗ 3 failed"
    assert row_cells(failing, NOW, [], wide=True)[-1] == "3 failed syncs in a row"


def test_calculator_figures() -> None:
    p = calc.plan(
        calc.parse_size("2 TiB"),
        calc.parse_link("1 Gbit/s"),
        calc.parse_percent("70"),
        calc.parse_percent("3"),
        30,
    )
    assert p.throughput_Bps == pytest.approx(1e9 / 8 * 0.7)
    assert p.initial_sync_s == pytest.approx(2 * 1024**4 / (1e9 / 8 * 0.7))
    assert 6.9 * 3600 < p.initial_sync_s < 7.0 * 3600
    # 30 s overhead, 0.9 % utilisation: the shortest interval with half of it free is 61 s
    assert p.cadence_s == 120 and p.promised_rpo_s == 300
    assert p.incremental_s is not None and p.incremental_s < p.cadence_s * calc.HEADROOM


def test_calculator_refuses_a_link_that_cannot_keep_up() -> None:
    p = calc.plan(10 * 1024**4, 10e6, 0.5, 0.5)
    assert p.promised_rpo_s is None and "cannot keep up" in p.verdict


@pytest.mark.parametrize(
    "text,problem",
    [
        ("", "type a size"),
        ("2 XB", "unknown unit"),
        ("-1 GiB", "type a size"),
        ("0 GiB", "more than zero"),
    ],
)
def test_calculator_size_input_errors(text: str, problem: str) -> None:
    with pytest.raises(calc.InputError, match=problem):
        calc.parse_size(text)


def test_protection_inputs() -> None:
    assert parse_rpo("15m") == 900 and parse_rpo("1h") == 3600 and parse_rpo("120") == 120
    for bad, why in (("", "empty"), ("soon", "not a duration"), ("30s", "too short")):
        with pytest.raises(ValueError, match=why):
            parse_rpo(bad)
    assert parse_throttle("") is None and parse_throttle("50M") == 50 * 1024**2
    with pytest.raises(ValueError, match="too low"):
        parse_throttle("1K")


def plan_text(**change: object) -> str:
    doc = ps.skeleton(
        "p1",
        [
            {"name": "db01", "cpus": 2, "memory_mib": 2048},
            {"name": "web01", "cpus": 1, "memory_mib": 1024},
        ],
    )
    doc["machines"][1].update(change)
    return ps.dumps(doc)


def test_plan_problem_points_at_line_and_fix() -> None:
    text = plan_text(cpus="two")
    [p] = ps.validate_text(text, {"db01", "web01"})
    line = text.splitlines()[p.line - 1]
    assert '"cpus": "two"' in line and p.path == "machines[1].cpus"
    assert p.fix == "write a whole number, e.g. 2"
    assert line[p.column - 1 :].startswith('"two"')


def test_plan_broken_json_says_where() -> None:
    text = plan_text().replace('"rank": 1,', '"rank": 1', 1)
    [p] = ps.validate_text(text, None)
    # JSON reports the missing comma where the next key starts: the line after "rank": 1
    assert "not valid JSON" in p.message and "just before" in p.fix
    assert text.splitlines()[p.line - 2].strip() == '"rank": 1'


def test_plan_rules_a_schema_cannot_say() -> None:
    text = plan_text(depends_on=["db01"], rank=1)
    doc = json.loads(text)
    doc["machines"][0]["depends_on"] = ["web01"]
    doc["machines"][0]["nics"] = [{"network": "prod"}]
    doc["machines"].append({"machine": "ghost", "rank": 1})
    found = {p.path: p for p in ps.validate_text(ps.dumps(doc), {"db01", "web01"})}
    assert "dependency cycle: db01 -> web01 -> db01" in found["machines[1].depends_on"].message
    assert "does not exist" in found["machines[0].nics[0].network"].message
    assert "no protected machine 'ghost'" in found["machines[2].machine"].message


def test_plan_clashing_addresses_and_rank_order() -> None:
    doc = json.loads(plan_text(rank=2))
    doc["machines"][0]["depends_on"] = ["web01"]
    for m in doc["machines"]:
        m["nics"] = [{"network": "test", "address": "10.0.0.5/24"}]
    msgs = [p.message for p in ps.validate_text(ps.dumps(doc), {"db01", "web01"})]
    assert any("boots later" in m for m in msgs)
    assert any("already used" in m for m in msgs)


def test_plan_diff() -> None:
    lines = ps.diff(plan_text(), plan_text(cpus=4), "v1", "v2")
    assert '-      "cpus": 1,' in lines and '+      "cpus": 4,' in lines


def test_timeline_letters_and_cutover_steps() -> None:
    def m(rank: int, c: float, w: float, b: float, r: float) -> dict[str, object]:
        return {
            "rank": rank,
            "state": "ready",
            "rto_s": c + w + b + r,
            "phases": {"convert_s": c, "wait_s": w, "boot_s": b, "ready_s": r},
        }

    run = {
        "report": {
            "machines": {
                "db01": {**m(1, 4, 0, 2, 2), "machine": "db01"},
                "web01": {**m(2, 2, 6, 1, 1), "machine": "web01"},
            },
            "totals": {"rto_s": 10},
        }
    }
    rows = timeline_rows(run, 10)
    assert [r[:4] for r in rows] == [
        ("db01", "1", "8s", "✓ ready"),
        ("web01", "2", "10s", "✓ ready"),
    ]
    assert rows[0][4] == "CCCCBBRR  " and rows[1][4] == "CC······BR"
    cut = {
        "state": "failed",
        "next": "final-delta",
        "report": {
            "stopped_wall": (NOW - timedelta(minutes=6)).timestamp(),
            "steps": [
                {"step": "preflight", "state": "done", "seconds": 0.0},
                {"step": "final-delta", "state": "failed", "seconds": 3.0},
            ],
        },
    }
    assert next_step(cut) == "final-delta"
    assert [s[2] for s in cutover_steps(cut)][:3] == ["done", "failed", "waiting"]
    assert cutover_steps(cut)[2][3] is True  # stop-source asks to type the plan name
    assert downtime_s(cut, NOW) == (360.0, True)
    assert downtime_s({"state": "committed", "report": {"downtime_s": 42.5}}, NOW) == (42.5, False)


def test_reachability_names_the_problem() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        problem = reachability(f"nbd://127.0.0.1:{port}/x", timeout=1)
    assert problem and "unreachable" in problem
    assert "not known" in (reachability("https://no-such-host.invalid", timeout=1) or "")
    assert "no socket" in (reachability("nbd+unix:///?socket=/nonexistent.sock") or "")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        assert reachability(f"nbd://127.0.0.1:{srv.getsockname()[1]}/") is None


def test_filter_words_and_exclusions() -> None:
    from tui.screens.events import words_match

    assert words_match("alice ssh:10.0.0.9 login ok", "alice login")
    assert not words_match("alice ssh:10.0.0.9 login ok", "alice -login")
    assert words_match("bob console job.sync job 12", "-login sync")


@pytest.mark.parametrize(
    ("term", "wanted", "theme"),
    [
        ("linux", "", "ansi-dark"),  # the appliance console: its own 16 colours
        ("xterm-256color", "", "ferryman"),
        ("xterm-256color", "nord", "nord"),
        ("linux", "no-such-theme", "ansi-dark"),  # logged and ignored, never a crash
    ],
)
def test_theme_for_the_terminal(
    term: str, wanted: str, theme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tui.app import FerrymanApp

    monkeypatch.setenv("TERM", term)
    monkeypatch.setenv("FERRYMAN_THEME", wanted)
    assert FerrymanApp().theme == theme
