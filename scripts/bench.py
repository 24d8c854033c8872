"""Runs every scripts/bench.d/*.py module and collects its metrics.

A module exposes ``IDS`` (the metric ids it produces) and ``run(ids) -> list[dict]`` with
objects ``{"id", "ours", "reference", "ratio", "goal", "unit", "detail"}``. A module that
crashes still yields its ids, with ``ratio`` null and the reason in ``detail``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("id", "ours", "reference", "ratio", "goal", "unit", "detail")


def load_modules() -> list[Any]:
    mods = []
    for path in sorted((ROOT / "scripts" / "bench.d").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(ROOT))
        spec.loader.exec_module(mod)
        mods.append(mod)
    return mods


def fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def main(argv: list[str]) -> int:
    wanted = set(argv)
    results: list[dict[str, Any]] = []
    for mod in load_modules():
        ids = list(getattr(mod, "IDS", []))
        chosen = [i for i in ids if not wanted or i in wanted]
        if not chosen:
            continue
        start = time.monotonic()
        print(f"== {Path(mod.__file__).name}: {', '.join(chosen)}", file=sys.stderr, flush=True)
        try:
            rows = mod.run(chosen)
        except Exception as e:
            tb = traceback.format_exc().strip().splitlines()[-1]
            rows = [
                {
                    "id": i,
                    "ours": None,
                    "reference": None,
                    "ratio": None,
                    "goal": None,
                    "unit": "",
                    "detail": f"benchmark crashed: {e!r} ({tb})",
                }
                for i in chosen
            ]
        for r in rows:
            results.append({k: r.get(k) for k in KEYS})
        print(f"   {time.monotonic() - start:.0f} s", file=sys.stderr)
    unknown = wanted - {r["id"] for r in results}
    if unknown:
        print(f"bench: unknown id(s): {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    (ROOT / "bench-results.json").write_text(json.dumps(results, indent=2) + "\n")
    widths = (34, 10, 10, 7, 8, 6)
    head = ("ID", "OURS", "REFERENCE", "RATIO", "GOAL", "UNIT")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + "  DETAIL")
    for r in results:
        cells = (
            r["id"],
            fmt(r["ours"]),
            fmt(r["reference"]),
            fmt(r["ratio"]),
            fmt(r["goal"]),
            r["unit"] or "",
        )
        print(
            "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))
            + "  "
            + (r["detail"] or "")
        )
    print(f"\nwritten: {ROOT / 'bench-results.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
