"""Build the Ferryman appliance: a bootable Debian 12 qcow2 with every component installed.

Why this shape: the appliance runs in air-gapped sites, so nothing may be fetched when it runs,
and a build must be repeatable. Every download is cached under
``${FERRYMAN_CACHE:-/var/cache/ferryman}/appliance/`` so that a second build needs no network:

1. ``apt/``: the debootstrap tarball of ``--variant=minbase``, the apt package lists and every
   .deb apt downloaded (bind-mounted into the build chroot).
2. ``wheels/<key>/``: the pinned Python dependencies of pyproject.toml as wheels.
3. ``rootfs-<key>.tar``: minbase plus ``packages.txt``, installed natively in a chroot on the
   host. The exact versions of the installed set are pinned in ``packages.lock`` (written by
   the first build): later builds install ``pkg=version`` for every line of it from the cached
   lists and .debs, so the same inputs give the same package set.
4. ``ferryman-appliance-<key>.qcow2``: the root tree gets the recipe (``overlay/``,
   ``customize.sh``) and a Ferryman release installed from the wheelhouse (the same
   ``ferryman-update`` code that applies update bundles on the appliance), then
   ``mkfs.ext4 -d`` makes the root file system natively, and one libguestfs launch installs GRUB.

Cache keys are content hashes, never a version to bump by hand: a stage's key hashes the path,
executable bit and bytes of every file among its inputs that git tracks or would track
(``git ls-files --cached --others --exclude-standard``: what .gitignore excludes, such as
``__pycache__``, is no input), as the files are in the working tree, so any change to an input
rebuilds the stage and everything after it.
The rootfs hashes the package lists, ``rootfs.sh`` and the source of the functions of this file
that make it; the image hashes the rootfs and wheelhouse keys, every tracked file of
``images/appliance/`` and Ferryman's sources (``pyproject.toml``, ``appliance/``, ``store/``,
``tui/``). build() snapshots those files once and builds from the snapshot, so the key names
exactly what is in the image.

``build()`` returns the image path and writes ``<image>.json`` with the size and the versions
inside. ``bundle()`` builds an offline update bundle (wheels + manifest + sha256 sidecar).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SUITE = "bookworm"
DISK_SIZE = 16 * 1024**3  # virtual; the qcow2 stays small. The volume store wants a data disk.
ROOT_UUID = "f3e1a7c2-6b1d-4c5e-9a8f-0000000000a1"  # fixed: reproducible images, known fstab
PART_START = 2048  # sectors
# Inputs of each stage, relative to the repository (directories: every tracked file in them).
PROJECT_DIRS = ("appliance", "store", "tui")
PROJECT_INPUTS = ("pyproject.toml", *PROJECT_DIRS)
ROOTFS_INPUTS = tuple(
    f"images/appliance/{n}" for n in ("packages.txt", "packages.lock", "rootfs.sh")
)
RECIPE_INPUTS = ("images/appliance",)


class BuildError(Exception):
    """The appliance could not be built; the message names the stage, the log and the fix."""


def cache_dir() -> Path:
    d = Path(os.environ.get("FERRYMAN_CACHE", "/var/cache/ferryman")) / "appliance"
    d.mkdir(parents=True, exist_ok=True)
    return d


# -- helpers ---------------------------------------------------------------------------------


def _run(cmd: list[str], logf: Path, **kw: object) -> str:
    with logf.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
    r = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)  # type: ignore[call-overload]
    with logf.open("a") as out:
        out.write(r.stdout)
        out.write(r.stderr)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or [""]
        raise BuildError(
            f"{cmd[0]} failed with status {r.returncode} ({tail[0][:200]}); see {logf}"
        )
    return str(r.stdout)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _sha(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def tracked_names(paths: tuple[str, ...]) -> list[str]:
    """Every file under ``paths`` (repository-relative) that git tracks or would track: the
    tracked ones and the new ones .gitignore does not exclude (a module written but not yet
    added must not be missing from the image), plus any of ``paths`` that is itself a file."""
    listing = ["ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    r = subprocess.run(
        ["git", "-C", str(REPO), *listing, "--", *paths],
        capture_output=True,
        check=False,
    )
    if r.returncode != 0:
        raise BuildError(
            f"git ls-files failed in {REPO} ({r.stderr.decode(errors='replace').strip()[:200]}); "
            "the appliance is built from a git checkout of Ferryman"
        )
    names = {n for n in r.stdout.decode().split("\0") if n}
    names |= {p for p in paths if (REPO / p).is_file()}
    return sorted(names)


def _key_of(root: Path, names: list[str]) -> str:
    """Hash of the files ``names`` under ``root``: path, executable bit and bytes (a symlink by
    its target; a tracked file deleted from the working tree by its absence)."""
    h = hashlib.sha256()
    for name in names:
        f = root / name
        h.update(name.encode() + b"\0")
        if f.is_symlink():
            h.update(b"link:" + os.readlink(f).encode())
        elif f.is_file():
            h.update(b"x" if os.access(f, os.X_OK) else b"-")
            h.update(hashlib.sha256(f.read_bytes()).digest())
        else:
            h.update(b"deleted")
        h.update(b"\0")
    return h.hexdigest()[:16]


def content_key(paths: tuple[str, ...]) -> str:
    """Key of the tracked files under ``paths`` as they are in the working tree now."""
    return _key_of(REPO, tracked_names(paths))


def snapshot(paths: tuple[str, ...], dest: Path) -> str:
    """Copy the tracked files under ``paths`` into ``dest`` (same relative paths, modes kept)
    and return the key of the copies: the key names exactly what was copied, even when the
    working tree changes during a build (other people edit the same checkout)."""
    names = tracked_names(paths)
    for name in names:
        f = REPO / name
        if f.is_symlink() or f.exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest / name, follow_symlinks=False)
    return _key_of(dest, names)


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    out = []
    for ln in path.read_text().splitlines():
        ln = ln.split("#", 1)[0].strip()
        if ln:
            out.append(ln)
    return out


def host_devices_kept() -> contextlib.AbstractContextManager[None]:
    """images/guests/builder.py's keeper of the host's device nodes (a chroot shares /dev)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "guests"))
    import builder

    return builder.host_devices_kept()  # type: ignore[no-any-return]


@contextlib.contextmanager
def _chroot_mounts(root: Path, binds: dict[str, Path]) -> Iterator[None]:
    """proc, sys, dev and the apt caches inside ``root``; always unmounted again."""
    mounted: list[Path] = []
    try:
        for fstype, where in (("proc", "proc"), ("sysfs", "sys")):
            (root / where).mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", fstype, fstype, str(root / where)], check=True)
            mounted.append(root / where)
        for inside, outside in [("dev", Path("/dev")), *binds.items()]:
            target = root / inside
            target.mkdir(parents=True, exist_ok=True)
            outside.mkdir(parents=True, exist_ok=True)
            subprocess.run(["mount", "--bind", str(outside), str(target)], check=True)
            mounted.append(target)
        yield
    finally:
        for m in reversed(mounted):
            subprocess.run(["umount", "-l", str(m)], check=False)


# -- stage 1+3: the Debian root tree ---------------------------------------------------------


def apt_mirror() -> str:
    """The Debian mirror apt already uses (deb822 sources first, then sources.list)."""
    for src in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in src.read_text().splitlines():
            if line.startswith("URIs:") and line.split()[1].rstrip("/").endswith("/debian"):
                return line.split()[1]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[1].rstrip("/").endswith("/debian"):
                return parts[1]
    return "http://deb.debian.org/debian"


def _sources(mirror: str) -> str:
    security = mirror.rstrip("/").removesuffix("/debian") + "/debian-security"
    return (
        f"Types: deb\nURIs: {mirror}\nSuites: {SUITE} {SUITE}-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        f"Types: deb\nURIs: {security}\nSuites: {SUITE}-security\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )


def lock_path() -> Path:
    return HERE / "packages.lock"


def rootfs_key() -> str:
    """Package lists, rootfs.sh and the code of this file that makes the tree (the source of
    those functions, so that an edit elsewhere in this file does not cost a Debian rebuild)."""
    code = (_run, _lines, _chroot_mounts, apt_mirror, _sources, rootfs_tarball)
    return _sha(
        content_key(ROOTFS_INPUTS).encode(),
        SUITE.encode(),
        *(inspect.getsource(f).encode() for f in code),
    )


def rootfs_tarball(*, refresh: bool = False) -> Path:
    """minbase + packages.txt (versions from packages.lock) as a .tar; cached."""
    cache = cache_dir()
    with _lock(cache / ".rootfs.lock"):
        out = cache / f"rootfs-{rootfs_key()}.tar"
        if out.exists():
            return out
        logf = cache / "rootfs.log"
        logf.write_text(f"rootfs build {datetime.datetime.now(datetime.UTC).isoformat()}\n")
        apt = cache / "apt"
        (apt / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        (apt / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        mirror = apt_mirror()
        debs = apt / f"debootstrap-{SUITE}-minbase.tgz"
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8")
        try:
            if not debs.exists():
                log.info("downloading Debian %s minbase (debootstrap)", SUITE)
                _run(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        f"--make-tarball={debs}.part",
                        SUITE,
                        str(work / "dl"),
                        mirror,
                    ],
                    logf,
                )
                os.rename(f"{debs}.part", debs)
            tree = work / "root"
            log.info("unpacking minbase")
            _run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--unpack-tarball={debs}",
                    SUITE,
                    str(tree),
                    mirror,
                ],
                logf,
                env=env,
            )
            (tree / "etc/apt/sources.list").unlink(missing_ok=True)
            (tree / "etc/apt/sources.list.d/debian.sources").write_text(_sources(mirror))
            # Services must not start inside the build chroot.
            rc = tree / "usr/sbin/policy-rc.d"
            rc.write_text("#!/bin/sh\nexit 101\n")
            rc.chmod(0o755)
            lists_empty = not any((apt / "lists").glob("*_Packages*"))
            pinned = _lines(lock_path())
            wanted = pinned or _lines(HERE / "packages.txt")
            binds = {"var/cache/apt/archives": apt / "archives", "var/lib/apt/lists": apt / "lists"}
            with _chroot_mounts(tree, binds):
                if refresh or lists_empty:
                    log.info("apt-get update (the only step with network besides downloads)")
                    _run(["chroot", str(tree), "apt-get", "update", "-q"], logf, env=env)
                log.info("installing %d packages in the chroot", len(wanted))
                try:
                    _run(
                        [
                            "chroot",
                            str(tree),
                            "apt-get",
                            "install",
                            "-y",
                            "-q",
                            "--no-install-recommends",
                            "--allow-downgrades",
                            *wanted,
                        ],
                        logf,
                        env=env,
                    )
                except BuildError as e:
                    if pinned:
                        raise BuildError(
                            f"installing the pinned package set failed ({e}); a version in "
                            f"{lock_path()} is no longer in the cached lists or on the mirror: "
                            "run images/appliance/build --relock to move to current packages"
                        ) from e
                    raise
                manifest = _run(
                    ["chroot", str(tree), "dpkg-query", "-W", "-f", "${Package}=${Version}\n"],
                    logf,
                )
            installed = sorted(ln for ln in manifest.splitlines() if ln)
            if pinned and sorted(pinned) != installed:
                extra = sorted(set(installed) - set(pinned))[:5]
                missing = sorted(set(pinned) - set(installed))[:5]
                raise BuildError(
                    f"the installed package set differs from {lock_path()} (extra {extra}, "
                    f"missing {missing}); run images/appliance/build --relock to re-pin"
                )
            if not pinned:
                lock_path().write_text(
                    "# Exact Debian package set of the appliance, captured by the first build.\n"
                    "# Regenerate with: images/appliance/build --relock\n"
                    + "\n".join(installed)
                    + "\n"
                )
                log.info("pinned %d packages in %s (commit it)", len(installed), lock_path())
            _run(["bash", str(HERE / "rootfs.sh"), str(tree)], logf, env=env)
            out = cache / f"rootfs-{rootfs_key()}.tar"
            _run(
                ["tar", "-C", str(tree), "--numeric-owner", "--xattrs", "-cf", f"{out}.part", "."],
                logf,
            )
            os.rename(f"{out}.part", out)
            for old in cache.glob("rootfs-*.tar"):
                if old != out:
                    old.unlink()
        finally:
            subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
        return out


# -- stage 2: the wheelhouse -----------------------------------------------------------------


def _project() -> dict[str, object]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return dict(data["project"])


def wheels_lock_path() -> Path:
    return HERE / "wheels.lock"


def deps_key() -> str:
    lock = wheels_lock_path().read_bytes() if wheels_lock_path().exists() else b""
    return _sha(json.dumps(_project()["dependencies"]).encode(), lock, b"cp311-linux-x86_64")


def _wheel_pins(wheels: Path) -> list[str]:
    pins = []
    for w in sorted(wheels.glob("*.whl")):
        name, version = w.name.split("-")[:2]
        pins.append(f"{name}=={version}")
    return pins


def wheelhouse() -> Path:
    """Wheels of the pinned dependencies (cached; offline after the first build)."""
    cache = cache_dir()
    out = cache / "wheels" / deps_key()
    if (out / ".complete").exists():
        return out
    with _lock(cache / ".wheels.lock"):
        if (out / ".complete").exists():
            return out
        logf = cache / "wheels.log"
        logf.write_text("")
        out.mkdir(parents=True, exist_ok=True)
        deps = [str(d) for d in _project()["dependencies"]]  # type: ignore[attr-defined]
        pinned = _lines(wheels_lock_path())
        if pinned:
            # Every wheel, transitive ones included, at the version the first build took.
            deps = [*pinned, "--no-deps"]
        log.info("downloading %d pinned Python packages as wheels", len(deps))
        _run(
            [
                "/usr/bin/python3",
                "-m",
                "pip",
                "wheel",
                "--disable-pip-version-check",
                "--cache-dir",
                str(cache / "pip"),
                "--wheel-dir",
                str(out),
                *deps,
            ],
            logf,
        )
        if not pinned:
            wheels_lock_path().write_text(
                "# Every wheel of the appliance's Python environment, captured by the first build\n"
                "# from pyproject.toml's pins. Delete it (or run build --relock) to re-resolve.\n"
                + "\n".join(_wheel_pins(out))
                + "\n"
            )
            out = out.rename(out.with_name(deps_key()))
        (out / ".complete").write_text("\n".join(deps) + "\n")
    return out


def project_key() -> str:
    return content_key(PROJECT_INPUTS)


def project_version() -> str:
    return str(_project()["version"])


def release_id(key: str | None = None) -> str:
    return f"{project_version()}-{(key or project_key())[:8]}"


def project_wheel(
    dest: Path, logf: Path, version: str | None = None, source: Path | None = None
) -> tuple[Path, str]:
    """A wheel of Ferryman built from a copy of the sources (the checkout stays clean), and the
    key of the sources it was built from (project_key() of that copy).

    ``source`` is a snapshot() of PROJECT_INPUTS to build from (default: the working tree).
    ``version`` stamps another version into the copy (pyproject.toml and
    ``appliance.__version__``): hotfix bundles, and the tests of update and rollback.
    """
    src = dest / "src"
    if source is None:
        key = snapshot(PROJECT_INPUTS, src)
    else:
        shutil.copytree(source, src, symlinks=True)
        key = _key_of(src, tracked_names(PROJECT_INPUTS))
    if version:
        old = project_version()
        for rel, before, after in (
            ("pyproject.toml", f'version = "{old}"', f'version = "{version}"'),
            ("appliance/__init__.py", f'__version__ = "{old}"', f'__version__ = "{version}"'),
        ):
            text = (src / rel).read_text()
            if before not in text:
                raise BuildError(f"cannot stamp version {version}: {rel} has no {before!r}")
            (src / rel).write_text(text.replace(before, after, 1))
    _run(
        [
            "/usr/bin/python3",
            "-m",
            "pip",
            "wheel",
            "--disable-pip-version-check",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(dest / "wheel"),
            str(src),
        ],
        logf,
    )
    wheels = list((dest / "wheel").glob("ferryman-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"building the Ferryman wheel gave {wheels}; see {logf}")
    return wheels[0], key


def bundle(out_dir: Path, *, release: str | None = None, version: str | None = None) -> Path:
    """Offline update bundle: ``ferryman-update-<release>.tar`` + ``.sha256`` sidecar."""
    cache = cache_dir()
    logf = cache / "bundle.log"
    logf.write_text("")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bundle-", dir=cache))
    try:
        stage = work / "stage"
        (stage / "wheels").mkdir(parents=True)
        wheel, key = project_wheel(work / "build", logf, version)
        release = release or (f"{version}-{key[:8]}" if version else release_id(key))
        for w in [*wheelhouse().glob("*.whl"), wheel]:
            shutil.copy2(w, stage / "wheels" / w.name)
        files = {
            f"wheels/{w.name}": hashlib.sha256(w.read_bytes()).hexdigest()
            for w in sorted((stage / "wheels").glob("*.whl"))
        }
        manifest = {
            "format": 1,
            "release": release,
            "version": version or project_version(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "python": "cp311",
            "files": files,
        }
        (stage / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
        tar = out_dir / f"ferryman-update-{release}.tar"
        _run(
            [
                "tar",
                "-C",
                str(stage),
                "--owner=0",
                "--group=0",
                "--sort=name",
                "-cf",
                str(tar),
                "MANIFEST.json",
                "wheels",
            ],
            logf,
        )
        digest = _file_sha256(tar)
        Path(f"{tar}.sha256").write_text(f"{digest}  {tar.name}\n")
        return tar
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- stage 4: the image ----------------------------------------------------------------------


def recipe_key() -> str:
    return content_key(RECIPE_INPUTS)


def image_key() -> str:
    return _sha(
        rootfs_key().encode(),
        deps_key().encode(),
        project_key().encode(),
        recipe_key().encode(),
    )


def keys() -> dict[str, str]:
    """Every cache key, for the build report and ``build --keys``."""
    return {
        "rootfs": rootfs_key(),
        "wheels": deps_key(),
        "ferryman_sources": project_key(),
        "recipe": recipe_key(),
        "image": image_key(),
    }


def image_path() -> Path:
    return cache_dir() / f"ferryman-appliance-{image_key()}.qcow2"


def _versions(tree: Path, logf: Path) -> dict[str, object]:
    pkgs = dict(
        ln.split("=", 1)
        for ln in _run(
            ["chroot", str(tree), "dpkg-query", "-W", "-f", "${Package}=${Version}\n"], logf
        ).splitlines()
        if "=" in ln
    )
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))
    venv = tree / "opt/ferryman/current/venv"
    py = sorted(
        p.name.removesuffix(".dist-info")
        for p in venv.glob("lib/python3*/site-packages/*.dist-info")
    )
    return {
        "debian": (tree / "etc/debian_version").read_text().strip(),
        "kernel": kernels,
        "debian_packages": len(pkgs),
        "components": {
            k: pkgs.get(k, "")
            for k in (
                "qemu-system-x86",
                "qemu-utils",
                "libvirt-daemon-system",
                "nbdkit",
                "libnbd-bin",
                "libguestfs-tools",
                "virt-v2v",
                "openssh-server",
                "python3",
                "systemd",
            )
        },
        "python_packages": py,
    }


def _make_tree(
    tree: Path, logf: Path, rootfs: Path, src: Path, image_keys: dict[str, str]
) -> dict[str, object]:
    """The root tree from the ``rootfs`` tarball, the recipe and Ferryman's sources in the
    snapshot ``src`` (see build()), keyed by ``image_keys``."""
    env = dict(
        os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C.UTF-8", FERRYMAN_ROOT_UUID=ROOT_UUID
    )
    tree.mkdir()
    _run(["tar", "-C", str(tree), "--numeric-owner", "--xattrs", "-xf", str(rootfs)], logf)
    _run(["bash", str(src / "recipe/images/appliance/customize.sh"), str(tree)], logf, env=env)
    # The Ferryman release: the same code path as an update bundle applied on the appliance.
    wh = tree / "tmp/wheelhouse"
    wh.mkdir()
    for w in wheelhouse().glob("*.whl"):
        shutil.copy2(w, wh)
    project_wheel(tree / "tmp/projwheel", logf, source=src / "project")
    release = release_id(image_keys["ferryman_sources"])
    for w in (tree / "tmp/projwheel/wheel").glob("*.whl"):
        shutil.copy2(w, wh)
    with _chroot_mounts(tree, {}):
        _run(
            [
                "chroot",
                str(tree),
                "/usr/local/sbin/ferryman-update",
                "install-wheels",
                "/tmp/wheelhouse",
                "--release",
                release,
            ],
            logf,
            env=env,
        )
    shutil.rmtree(wh)
    shutil.rmtree(tree / "tmp/projwheel")
    versions = _versions(tree, logf)
    info = {
        "image_key": image_keys["image"],
        "keys": image_keys,
        "built": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "ferryman": {"version": project_version(), "release": release},
        **versions,
    }
    (tree / "etc/ferryman").mkdir(exist_ok=True)
    (tree / "etc/ferryman/image.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def _make_disk(tree: Path, raw: Path, logf: Path) -> None:
    """Partition table + ext4 made natively (mkfs -d), then GRUB via one libguestfs launch."""
    import guestfs

    fs = raw.with_name("root.ext4")
    fs_bytes = DISK_SIZE - PART_START * 512
    with raw.open("wb") as f:
        f.truncate(DISK_SIZE)
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-L",
            "ferryman-root",
            "-U",
            ROOT_UUID,
            "-E",
            f"hash_seed={ROOT_UUID},root_owner=0:0",
            "-d",
            str(tree),
            str(fs),
            f"{fs_bytes // 1024}k",
        ],
        logf,
    )
    _run(
        ["sfdisk", "-q", str(raw)],
        logf,
        input=f"label: dos\nstart={PART_START}, type=83, bootable\n",
    )
    _run(
        [
            "dd",
            f"if={fs}",
            f"of={raw}",
            "bs=1M",
            f"seek={PART_START * 512}",
            "oflag=seek_bytes",
            "conv=notrunc,sparse",
            "status=none",
        ],
        logf,
    )
    fs.unlink()
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend(os.environ.get("LIBGUESTFS_BACKEND", "direct"))
    g.add_drive_opts(str(raw), format="raw", readonly=False)
    g.launch()
    try:
        g.mount("/dev/sda1", "/")
        # The kernel inside the libguestfs appliance may name this disk /dev/sdb (its own root
        # disk can come first): ask grub which disk holds /boot/grub instead of assuming sda.
        for cmd in (
            ["sh", "-c", "grub-install --target=i386-pc $(grub-probe -t disk /boot/grub)"],
            ["update-grub"],
        ):
            out = g.command(cmd)
            with logf.open("a") as f:
                f.write(f"\n$ (guest) {' '.join(cmd)}\n{out}\n")
        g.sync()
        g.umount_all()
        g.shutdown()
    finally:
        g.close()


def build(*, refresh: bool = False) -> Path:
    """Return the cached appliance image, building what changed. Writes ``<image>.json``."""
    out = image_path()
    if out.exists() and not refresh:
        return out
    cache = cache_dir()
    with _lock(cache / ".image.lock"):
        out = image_path()
        if out.exists() and not refresh:
            return out
        t0 = time.monotonic()
        with host_devices_kept():  # the chroot shares /dev: see images/guests/builder.py
            rootfs = rootfs_tarball(refresh=refresh)
        wheelhouse()
        work = Path(tempfile.mkdtemp(prefix="image-", dir=cache))
        try:
            # One snapshot of the recipe and the sources, taken after the first build wrote
            # packages.lock (part of the key): the key names exactly what goes into the image.
            src = work / "src"
            image_keys = {
                "rootfs": rootfs.stem.removeprefix("rootfs-"),
                "wheels": deps_key(),
                "ferryman_sources": snapshot(PROJECT_INPUTS, src / "project"),
                "recipe": snapshot(RECIPE_INPUTS, src / "recipe"),
            }
            image_keys["image"] = _sha(*(k.encode() for k in image_keys.values()))
            out = cache / f"ferryman-appliance-{image_keys['image']}.qcow2"
            if out.exists() and not refresh:
                return out
            logf = out.with_suffix(".log")
            logf.write_text("")
            log.info("assembling the root tree")
            info = _make_tree(work / "tree", logf, rootfs, src, image_keys)
            log.info("making the disk (mkfs.ext4 -d, GRUB through libguestfs)")
            raw = work / "disk.raw"
            _make_disk(work / "tree", raw, logf)
            subprocess.run(["rm", "-rf", "--one-file-system", str(work / "tree")], check=False)
            log.info("converting to compressed qcow2")
            part = work / "image.qcow2"
            _run(
                [
                    "qemu-img",
                    "convert",
                    "-c",
                    "-O",
                    "qcow2",
                    "-o",
                    "compat=1.1",
                    str(raw),
                    str(part),
                ],
                logf,
            )
            raw.unlink()
            part.chmod(0o444)
            os.rename(part, out)
            info["image"] = {
                "file": str(out),
                "bytes": out.stat().st_size,
                "virtual_bytes": DISK_SIZE,
                "sha256": _file_sha256(out),
                "build_seconds": round(time.monotonic() - t0),
            }
            out.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
        finally:
            subprocess.run(["rm", "-rf", "--one-file-system", str(work)], check=False)
        for old in cache.glob("ferryman-appliance-*"):
            if not old.name.startswith(out.stem):
                old.unlink(missing_ok=True)
        log.info("built %s in %.0f s", out, time.monotonic() - t0)
    return out


def report(image: Path) -> dict[str, object]:
    meta = image.with_suffix(".json")
    return dict(json.loads(meta.read_text())) if meta.exists() else {"image": {"file": str(image)}}


# -- OVA for vSphere -------------------------------------------------------------------------

OVA_CPUS = 4
OVA_MEMORY_MIB = 8192

_OVF = """<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="ferryman" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
  xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
  xmlns:vmw="http://www.vmware.com/schema/ovf"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <References>
    <File ovf:href="{vmdk}" ovf:id="file1" ovf:size="{vmdk_bytes}"/>
  </References>
  <DiskSection>
    <Info>Virtual disk information</Info>
    <Disk ovf:capacity="{capacity_gib}" ovf:capacityAllocationUnits="byte * 2^30"
      ovf:diskId="vmdisk1" ovf:fileRef="file1"
      ovf:format="http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"
      ovf:populatedSize="{populated}"/>
  </DiskSection>
  <NetworkSection>
    <Info>The list of logical networks</Info>
    <Network ovf:name="VM Network">
      <Description>Management network of the Ferryman appliance</Description>
    </Network>
  </NetworkSection>
  <VirtualSystem ovf:id="{name}">
    <Info>Ferryman migration and DR appliance {release}</Info>
    <Name>{name}</Name>
    <OperatingSystemSection ovf:id="96" vmw:osType="debian11_64Guest">
      <Info>Debian 12 (64-bit)</Info>
    </OperatingSystemSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <System>
        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>
        <vssd:InstanceID>0</vssd:InstanceID>
        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>
        <vssd:VirtualSystemType>vmx-14</vssd:VirtualSystemType>
      </System>
      <Item>
        <rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits>
        <rasd:Description>Number of Virtual CPUs</rasd:Description>
        <rasd:ElementName>{cpus} virtual CPU(s)</rasd:ElementName>
        <rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType>
        <rasd:VirtualQuantity>{cpus}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits>
        <rasd:Description>Memory Size</rasd:Description>
        <rasd:ElementName>{memory} MB of memory</rasd:ElementName>
        <rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType>
        <rasd:VirtualQuantity>{memory}</rasd:VirtualQuantity>
      </Item>
      <Item>
        <rasd:Address>0</rasd:Address>
        <rasd:Description>SCSI Controller</rasd:Description>
        <rasd:ElementName>SCSI controller 0</rasd:ElementName>
        <rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>VirtualSCSI</rasd:ResourceSubType>
        <rasd:ResourceType>6</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>Hard disk 1</rasd:ElementName>
        <rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource>
        <rasd:InstanceID>4</rasd:InstanceID>
        <rasd:Parent>3</rasd:Parent>
        <rasd:ResourceType>17</rasd:ResourceType>
      </Item>
      <Item>
        <rasd:AddressOnParent>7</rasd:AddressOnParent>
        <rasd:AutomaticAllocation>true</rasd:AutomaticAllocation>
        <rasd:Connection>VM Network</rasd:Connection>
        <rasd:Description>VmxNet3 ethernet adapter on "VM Network"</rasd:Description>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>VmxNet3</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType>
      </Item>
      <Item ovf:required="false">
        <rasd:AutomaticAllocation>false</rasd:AutomaticAllocation>
        <rasd:ElementName>Serial port 1</rasd:ElementName>
        <rasd:InstanceID>6</rasd:InstanceID>
        <rasd:ResourceType>21</rasd:ResourceType>
      </Item>
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="bios"/>
      <vmw:Config ovf:required="false" vmw:key="tools.syncTimeWithHost" vmw:value="false"/>
      <vmw:Config ovf:required="false" vmw:key="nestedHVEnabled" vmw:value="true"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>
"""


def ova(image: Path, out_dir: Path) -> Path:
    """An OVA (OVF 1.0 + streamOptimized VMDK + SHA256 manifest) of ``image``, offline.

    The disk is presented on VMware's paravirtual SCSI (vmw_pvscsi is in Debian's initramfs)
    with a VMXNET3 NIC; ``nestedHVEnabled`` exposes VT-x so the appliance can use KVM.
    """
    name = image.stem.replace("ferryman-appliance", "ferryman")
    out_dir.mkdir(parents=True, exist_ok=True)
    logf = cache_dir() / "ova.log"
    logf.write_text("")
    work = Path(tempfile.mkdtemp(prefix="ova-", dir=cache_dir()))
    try:
        vmdk = work / f"{name}-disk1.vmdk"
        _run(
            [
                "qemu-img",
                "convert",
                "-O",
                "vmdk",
                "-o",
                "subformat=streamOptimized",
                str(image),
                str(vmdk),
            ],
            logf,
        )
        info = json.loads(_run(["qemu-img", "info", "--output=json", str(image)], logf))
        ovf = work / f"{name}.ovf"
        ovf.write_text(
            _OVF.format(
                vmdk=vmdk.name,
                vmdk_bytes=vmdk.stat().st_size,
                capacity_gib=DISK_SIZE // 1024**3,
                populated=info.get("actual-size", 0),
                name=name,
                release=release_id(),
                cpus=OVA_CPUS,
                memory=OVA_MEMORY_MIB,
            )
        )
        mf = work / f"{name}.mf"
        mf.write_text("".join(f"SHA256({p.name})= {_file_sha256(p)}\n" for p in (ovf, vmdk)))
        out = out_dir / f"{name}.ova"
        # The OVF descriptor must be the first member of an OVA, the manifest may follow it.
        _run(
            [
                "tar",
                "-C",
                str(work),
                "--format=ustar",
                "--owner=0",
                "--group=0",
                "-cf",
                str(out),
                ovf.name,
                mf.name,
                vmdk.name,
            ],
            logf,
        )
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)
