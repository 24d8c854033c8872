"""The appliance image cache is keyed by the content of its tracked inputs (git ls-files), not
by a version bumped by hand: a change to any source file, package list or build script gives a
new key (so the image is rebuilt); an untracked scratch file does not.

Runs imagebuild from a throw-away git repository holding a copy of the tracked inputs (the
shared checkout is never touched).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
INPUTS = ("pyproject.toml", "appliance", "store", "tui", "images/appliance")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--", *INPUTS],
        capture_output=True,
        check=True,
    ).stdout.decode()
    dest = tmp_path / "repo"
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    subprocess.run(["git", "init", "-q", str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "add", "."], check=True)
    return dest


def keys(repo: Path) -> dict[str, str]:
    code = (
        "import json, sys; sys.path.insert(0, 'images/appliance'); import imagebuild; "
        "print(json.dumps({**imagebuild.keys(), 'release': imagebuild.release_id()}))"
    )
    r = subprocess.run(
        ["/usr/bin/python3", "-c", code], cwd=repo, capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {k for k in before if before[k] != after[k]}


def test_a_source_change_changes_the_image_key(repo: Path) -> None:
    k0 = keys(repo)
    assert keys(repo) == k0  # stable: same inputs, same keys
    with (repo / "appliance/__init__.py").open("a") as f:
        f.write("# a comment is a change too\n")
    k1 = keys(repo)
    assert changed(k0, k1) == {"ferryman_sources", "image", "release"}
    # A file under tui/ that is not Python is an input too (it goes into the wheel).
    tcss = sorted((repo / "tui").rglob("*.tcss"))
    assert tcss, "no tracked .tcss file under tui/"
    tcss[0].write_text(tcss[0].read_text() + "\n")
    assert changed(k1, keys(repo)) == {"ferryman_sources", "image", "release"}


def test_an_untracked_file_is_no_input_until_it_is_added(repo: Path) -> None:
    k0 = keys(repo)
    (repo / "appliance/scratch_notes.py").write_text("x = 1\n")
    assert keys(repo) == k0
    subprocess.run(["git", "-C", str(repo), "add", "appliance/scratch_notes.py"], check=True)
    assert changed(k0, keys(repo)) == {"ferryman_sources", "image", "release"}


def test_package_list_and_build_scripts_change_the_right_keys(repo: Path) -> None:
    k0 = keys(repo)
    here = repo / "images/appliance"
    (here / "packages.txt").write_text((here / "packages.txt").read_text() + "# same set\n")
    k1 = keys(repo)
    assert changed(k0, k1) == {"rootfs", "recipe", "image"}
    # The recipe (overlay, customize.sh) rebuilds the image, not the Debian tree.
    unit = here / "overlay/etc/systemd/system/ferrymand.service"
    unit.write_text(unit.read_text() + "# tweak\n")
    k2 = keys(repo)
    assert changed(k1, k2) == {"recipe", "image"}
    (here / "customize.sh").chmod(0o644)  # the executable bit counts
    k3 = keys(repo)
    assert changed(k2, k3) == {"recipe", "image"}
    # The build code itself: both the Debian tree and the image are rebuilt.
    (here / "imagebuild.py").write_text((here / "imagebuild.py").read_text() + "\n# edit\n")
    assert changed(k3, keys(repo)) == {"rootfs", "recipe", "image"}
    # pyproject.toml's pins decide the wheelhouse.
    py = repo / "pyproject.toml"
    text = py.read_text()
    assert "dependencies = [" in text
    py.write_text(text.replace("dependencies = [", 'dependencies = [\n    "six==1.16.0",', 1))
    k5 = keys(repo)
    assert {"wheels", "ferryman_sources", "image"} <= changed(k3, k5)
