"""A second build of the appliance needs no network: with only the downloads of an earlier
build (debootstrap tarball, apt lists and .debs, wheels) in a fresh cache, the whole build runs
in a network namespace that has no network (`unshare --net`) and gives the pinned package set.

A full build (Debian tree, image, GRUB): ~15-20 min on the loaded 2-core machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.appliance_vm import ROOT, build_image

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.timeout(3600),
    pytest.mark.appliance_vm,  # scripts/test --appliance
]

DOWNLOADS = ("apt", "wheels")  # what the network stages fetch; nothing built is copied


def _lines(path: Path) -> list[str]:
    return [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]


def norm(name: str) -> str:
    return name.lower().replace("_", "-")


def test_second_build_runs_without_network() -> None:
    sys.path.insert(0, str(ROOT / "images/appliance"))
    import imagebuild

    warm = imagebuild.cache_dir()
    if not any((warm / "wheels").glob(f"{imagebuild.deps_key()}/.complete")) or not any(
        (warm / "apt").glob("debootstrap-*.tgz")
    ):
        build_image()  # a first build (with network) fills the download cache
    fresh = warm.parent / f"offline-test-{os.getpid()}"
    try:
        (fresh / "appliance").mkdir(parents=True)
        for d in DOWNLOADS:
            subprocess.run(["cp", "-al", str(warm / d), str(fresh / "appliance" / d)], check=True)
        probe = subprocess.run(
            [
                "unshare",
                "--net",
                "/usr/bin/python3",
                "-c",
                "import socket; socket.create_connection(('deb.debian.org', 80), timeout=5)",
            ],
            capture_output=True,
            text=True,
        )
        assert probe.returncode != 0, "unshare --net still reaches the network"
        r = subprocess.run(
            ["unshare", "--net", str(ROOT / "images/appliance/build"), "--json"],
            env={**os.environ, "FERRYMAN_CACHE": str(fresh)},
            capture_output=True,
            text=True,
            timeout=3300,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        report = json.loads(r.stdout)
        image = Path(report["image"]["file"])
        assert image.name == f"ferryman-appliance-{report['image_key']}.qcow2"
        assert report["keys"]["rootfs"] == imagebuild.rootfs_key()  # the pinned Debian tree
        assert report["debian_packages"] == len(_lines(imagebuild.lock_path()))

        # Every package of the release venv at its pinned version (the rest of wheels.lock,
        # such as certifi or idna, is satisfied by Debian's python3 packages the venv sees).
        pinned = {tuple(map(norm, w.split("=="))) for w in _lines(imagebuild.wheels_lock_path())}
        venv = {tuple(map(norm, p.rsplit("-", 1))) for p in report["python_packages"]}
        assert ("ferryman", imagebuild.project_version()) in venv, venv
        own = {p for p in venv if p[0] in ("ferryman", "pip", "setuptools")}  # pip: the venv's
        assert venv - own <= pinned, venv - pinned
        assert image.parent == fresh / "appliance" and image.stat().st_size > 100 * 2**20
        print(f"offline build: {report['seconds_this_run']} s, {image.stat().st_size >> 20} MiB")
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(fresh)], check=False)
