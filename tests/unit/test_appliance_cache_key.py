"""The appliance image cache is keyed by the content of its inputs as git lists them (tracked
files and new ones .gitignore does not exclude), not by a version bumped by hand: a change to
any source file, package list or build script gives a new key (so the image is rebuilt); an
ignored file (byte code) does not.

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


def test_a_new_file_is_an_input_unless_git_ignores_it(repo: Path) -> None:
    k0 = keys(repo)
    # A module written but not yet added: it ships (a tracked file may import it), so it counts.
    (repo / "appliance/new_module.py").write_text("x = 1\n")
    k1 = keys(repo)
    assert changed(k0, k1) == {"ferryman_sources", "image", "release"}
    # What .gitignore excludes (byte code, caches) is no input.
    (repo / ".gitignore").write_text("__pycache__/\n*.pyc\n")
    (repo / "appliance/__pycache__").mkdir(exist_ok=True)
    (repo / "appliance/__pycache__/config.cpython-311.pyc").write_bytes(b"\0bytecode")
    assert keys(repo) == k1


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
    # The build code: a function that makes the Debian tree rebuilds it; other code only the
    # image.
    code = (here / "imagebuild.py").read_text()
    (here / "imagebuild.py").write_text(code + "\n# edit\n")
    k4 = keys(repo)
    assert changed(k3, k4) == {"recipe", "image"}
    assert '    cache = cache_dir()\n    with _lock(cache / ".rootfs.lock"):' in code
    (here / "imagebuild.py").write_text(
        code.replace(
            '    with _lock(cache / ".rootfs.lock"):',
            '    # edited\n    with _lock(cache / ".rootfs.lock"):',
        )
    )
    assert changed(k4, keys(repo)) == {"rootfs", "recipe", "image"}
    # pyproject.toml's pins decide the wheelhouse.
    py = repo / "pyproject.toml"
    text = py.read_text()
    assert "dependencies = [" in text
    py.write_text(text.replace("dependencies = [", 'dependencies = [\n    "six==1.16.0",', 1))
    k5 = keys(repo)
    assert {"wheels", "ferryman_sources", "image"} <= changed(k3, k5)


def test_a_snapshot_is_keyed_by_what_it_copied(repo: Path) -> None:
    """build() keys the image by a snapshot of the sources: an edit during the build (others
    share the checkout) changes neither the copied files nor their key."""
    code = (
        "import json, sys; from pathlib import Path; sys.path.insert(0, 'images/appliance'); "
        "import imagebuild as b; dest = Path(sys.argv[1]); k = b.snapshot(b.PROJECT_INPUTS, dest); "
        "Path('appliance/__init__.py').write_text('# edited during the build\\n'); "
        "names = b.tracked_names(b.PROJECT_INPUTS); "
        "print(json.dumps([k, b.project_key(), b._key_of(dest, names)]))"
    )
    before = keys(repo)["ferryman_sources"]
    r = subprocess.run(
        ["/usr/bin/python3", "-c", code, str(repo.parent / "snap")],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    snap_key, live_key, copies_key = json.loads(r.stdout)
    assert snap_key == before == copies_key and live_key != before
    assert (repo.parent / "snap/appliance/__init__.py").read_text() != (
        "# edited during the build\n"
    )
    assert not (repo.parent / "snap/images").exists()  # only the inputs asked for
