"""appliance/ and store/ never import Textual or tui: by contract and at run time."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import appliance
import store

ROOT = Path(__file__).resolve().parents[2]


def all_modules() -> list[str]:
    """Every engine and store module, except nbdkit plugins (``*_plugin``): those run inside
    nbdkit, whose ``nbdkit`` module exists only there."""
    names = []
    for pkg in (appliance, store):
        names.append(pkg.__name__)
        for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            if not m.name.endswith("_plugin"):
                names.append(m.name)
    return names


def test_engine_imports_leave_textual_unloaded() -> None:
    mods = all_modules()
    assert "appliance.daemon.main" in mods and "store.db" in mods
    code = (
        "import importlib, sys\n"
        f"for m in {mods!r}:\n"
        "    importlib.import_module(m)\n"
        "bad = sorted(n for n in sys.modules if n == 'textual' or n.startswith(('textual.',"
        " 'tui')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip() == ""


def test_import_linter_contract() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    out = subprocess.run([str(lint)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Engine and store never import the UI KEPT" in out.stdout
