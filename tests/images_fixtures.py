"""Fixtures that hand out the test guests of images/guests (built once, cached outside the clone).

Wire into tests/conftest.py with ``pytest_plugins = ["tests.images_fixtures"]`` (or import the
names). Every image fixture is session-scoped: the first use builds it (~3.5 min for a Debian
guest under TCG, once per recipe change), later uses are a cache lookup. Tests never write an
image: they take an overlay with ``overlay_factory``.

Fixtures:
    vmware_like_image, lvm_static_image, windows_phony_image   -> Path (read-only qcow2)
    overlay_factory(base, name) -> Path                         -> new qcow2 overlay in tmp
    virtio_win_tree -> (virtio_win: Path, virt_tools_dir: Path)   a test virtio-win tree
    converted_vmware_like                                       -> (ConvertResult, Path), builtin
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("LIBGUESTFS_BACKEND", "direct")
os.environ.setdefault("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")


def _builder() -> ModuleType:
    path = ROOT / "images" / "guests" / "builder.py"
    spec = importlib.util.spec_from_file_location("ferryman_images_builder", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def build_image(name: str) -> Path:
    """images/guests/build NAME, from Python (builds once per recipe, then a lookup)."""
    pytest.importorskip("guestfs", reason="python3-guestfs is needed to build test guests")
    return Path(_builder().build(name))


@pytest.fixture(scope="session")
def vmware_like_image() -> Path:
    return build_image("vmware-like")


@pytest.fixture(scope="session")
def lvm_static_image() -> Path:
    return build_image("lvm-static")


@pytest.fixture(scope="session")
def windows_phony_image() -> Path:
    return build_image("windows-phony")


@pytest.fixture
def overlay_factory(tmp_path: Path) -> Callable[[Path, str], Path]:
    def make(base: Path, name: str) -> Path:
        ov = tmp_path / f"{name}.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "qcow2", str(ov)],
            check=True,
        )
        return ov

    return make


@pytest.fixture(scope="session")
def virtio_win_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A virtio-win tree laid out like the ISO (driver/os/arch), with stand-in driver files,
    and a virt-tools directory with stand-ins for rhsrvany.exe and pnp_wait.exe. Enough for
    virt-v2v to copy drivers and write registry entries; nothing here ever runs."""
    base = tmp_path_factory.mktemp("virtio-win")
    vw = base / "virtio-win"
    for drv, files in {
        "viostor": ("viostor.sys", "viostor.inf", "viostor.cat"),
        "vioscsi": ("vioscsi.sys", "vioscsi.inf", "vioscsi.cat"),
        "NetKVM": ("netkvm.sys", "netkvm.inf", "netkvm.cat"),
        "Balloon": ("balloon.sys", "balloon.inf", "balloon.cat"),
        "vioserial": ("vioser.sys", "vioser.inf", "vioser.cat"),
    }.items():
        d = vw / drv / "2k22" / "amd64"
        d.mkdir(parents=True)
        for f in files:
            (d / f).write_bytes(f"ferryman test stand-in for {f}\n".encode())
    tools = base / "virt-tools"
    tools.mkdir()
    for f in ("rhsrvany.exe", "pnp_wait.exe"):
        (tools / f).write_bytes(b"MZ ferryman test stand-in\n")
    return vw, tools


@pytest.fixture(scope="session")
def converted_vmware_like(
    vmware_like_image: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[object, Path]]:
    """vmware-like converted once per session by the built-in converter (append strategy)."""
    from appliance.convert.api import convert

    ov = tmp_path_factory.mktemp("converted") / "vmware-like-builtin.qcow2"
    result = convert(vmware_like_image, ov, backend="builtin")
    yield result, ov
    ov.unlink(missing_ok=True)
