"""Run the fault-injection suite and print the coverage table of shared/reliability.md.

    python -m tests.reliability.runner            # run every row's tests, print the table
    python -m tests.reliability.runner --list     # only show which tests cover which row

A test covers a row by its file name (``test_row_03_04_connection.py`` covers rows 3 and 4)
or by a marker (``@pytest.mark.row(23)``), wherever it lives. The table shows each row, the
injected fault, the outcome (passed / FAILED / not covered) and the proof the tests assert.
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
    def __init__(self) -> None:
        self.by_row: dict[int, list[tuple[str, str]]] = defaultdict(list)

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        keep = [i for i in items if rows_of(i)]
        items[:] = keep
        self.items = {i.nodeid: rows_of(i) for i in keep}

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            for r in self.items.get(report.nodeid, ()):
                self.by_row[r].append((report.nodeid, report.outcome))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="reliability")
    ap.add_argument("--list", action="store_true", help="collect only")
    args, rest = ap.parse_known_args(argv)
    col = Collector()
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
        if not covering:
            outcome = "not covered"
        elif args.list:
            outcome = f"{len(covering)} test(s)"
        elif any(o != "passed" for _, o in results) or len(results) < len(covering):
            outcome = "FAILED"
        else:
            outcome = "passed"
        print(f"{r:<4} {outcome:<12} {fault[:48]:<48} {must[:70]}")
        for n in covering:
            print(f"{'':<66}- {n}")
    return int(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
