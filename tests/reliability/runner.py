"""Run the fault-injection suite and print the coverage table of shared/reliability.md.

    python -m tests.reliability.runner              # run every row's tests, print the table
    python -m tests.reliability.runner --list       # only show which tests cover which row
    python -m tests.reliability.runner --appliance  # also boot the appliance image (40-50 min)

A test covers a row by its file name (``test_row_03_04_connection.py`` covers rows 3 and 4),
by a marker (``@pytest.mark.row(23)``), or by its node id in ``MAPPED`` below (tests of other
issues that prove a row as they stand). The table shows each row, the injected fault, the
outcome (passed / FAILED / not covered / not run) and the proof the tests assert. Tests marked
appliance_vm run only with --appliance, as in ``scripts/test --appliance``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILE_RE = re.compile(r"test_row_((?:\d+_?)+)")
SPEC_CANDIDATES = [ROOT.parent / "shared" / "reliability.md", ROOT / "docs" / "reliability.md"]

# Tests written for other issues that prove a row: row -> node ids.
MAPPED: dict[int, list[str]] = {
    10: ["tests/integration/test_vsphere.py::test_disk_resized_leads_to_full_resync"],
    21: [
        "tests/integration/test_convert_inspect.py::"
        "test_damaged_disk_clear_error_in_time_nothing_mounted"
    ],
    22: [
        "tests/integration/test_vsphere.py::test_changed_certificate_refused_before_credentials",
        "tests/integration/test_vsphere.py::"
        "test_pinned_reader_refuses_a_changed_certificate_before_sending_the_cookie",
        "tests/integration/test_vsphere.py::"
        "test_ca_mode_insecure_mode_and_a_pinned_certificate_for_another_host",
    ],
    23: ["tests/integration/test_vsphere.py::test_secret_canary_never_leaks"],
    25: ["tests/e2e/test_tui_ssh.py::test_tui_over_ssh_in_tmux"],
}


def rows_of(item: pytest.Item) -> set[int]:
    """The test function's own name first (test_row_03_...), else its file's name."""
    rows: set[int] = set()
    m = FILE_RE.match(getattr(item, "originalname", item.name)) or FILE_RE.search(
        Path(str(item.fspath)).name
    )
    if m:
        rows |= {int(x) for x in m.group(1).strip("_").split("_") if x}
    for mark in item.iter_markers("row"):
        rows |= {int(a) for a in mark.args}
    base = item.nodeid.split("[", 1)[0]
    rows |= {r for r, ids in MAPPED.items() if base in ids}
    return rows


def spec() -> dict[int, tuple[str, str, str]]:
    """Row -> (fault, how to inject, what must hold), from the reliability table."""
    for path in SPEC_CANDIDATES:
        if path.exists():
            out = {}
            for line in path.read_text().splitlines():
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                if len(cells) >= 4 and cells[0].isdigit():
                    out[int(cells[0])] = (cells[1], cells[2], cells[3])
            return out
    return {}


class Collector:
    def __init__(self, appliance: bool = False) -> None:
        self.appliance = appliance
        self.by_row: dict[int, list[tuple[str, str]]] = defaultdict(list)
        self.items: dict[str, set[int]] = {}
        self.not_run: set[str] = set()

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        covering = [i for i in items if rows_of(i)]
        self.items = {i.nodeid: rows_of(i) for i in covering}
        self.not_run = {
            i.nodeid
            for i in covering
            if not self.appliance and i.get_closest_marker("appliance_vm") is not None
        }
        items[:] = [i for i in covering if i.nodeid not in self.not_run]

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            for r in self.items.get(report.nodeid, ()):
                self.by_row[r].append((report.nodeid, report.outcome))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="reliability")
    ap.add_argument("--list", action="store_true", help="collect only")
    ap.add_argument("--appliance", action="store_true", help="also the appliance_vm tests")
    args, rest = ap.parse_known_args(argv)
    col = Collector(appliance=args.appliance)
    pytest_args = ["-q", "-p", "no:cacheprovider", "tests", *rest]
    if args.list:
        pytest_args.append("--collect-only")
    code = pytest.main(pytest_args, plugins=[col])
    table = spec()
    rows = sorted(set(table) | set(col.by_row) | {r for s in col.items.values() for r in s})
    print(f"\n{'ROW':<4} {'OUTCOME':<12} {'FAULT':<48} TESTS / WHAT MUST HOLD")
    for r in rows:
        fault, _how, must = table.get(r, ("?", "", ""))
        results = col.by_row.get(r, [])
        covering = [n for n, s in col.items.items() if r in s]
        ran = [n for n in covering if n not in col.not_run]
        if not covering:
            outcome = "not covered"
        elif args.list:
            outcome = f"{len(covering)} test(s)"
        elif not ran:
            outcome = "not run"
        elif any(o != "passed" for _, o in results) or len(results) < len(ran):
            outcome = "FAILED"
        else:
            outcome = "passed*" if len(ran) < len(covering) else "passed"
        print(f"{r:<4} {outcome:<12} {fault[:48]:<48} {must[:70]}")
        for n in covering:
            note = "  (not run: --appliance)" if n in col.not_run else ""
            print(f"{'':<66}- {n}{note}")
    if col.not_run:
        print(f"\n* {len(col.not_run)} appliance-image test(s) not run: --appliance runs them")
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
