"""Offline, cached builds of the test guests that the conversion tests and benchmark boot.

Why this shape: a guest image takes minutes to build under TCG and the tests need the same
bytes every time, so every image is cached outside the clone under
``${FERRYMAN_CACHE:-/var/cache/ferryman}/images/`` and keyed by a hash of the recipe files that
produce it. Change a recipe file and the next call rebuilds; otherwise the call is a lookup.

Two stages:

1. ``rootfs``: ``debootstrap --variant=minbase`` of Debian 12 plus packages.txt from the mirror
   apt uses, packed as a tarball (the only stage that needs the network; the downloaded .debs are
   cached as a debootstrap tarball too). No initramfs yet (INITRD=No): each guest makes its own.
2. per guest: the rootfs is customised on the host (files from the guest's recipe folder, after
   its base recipe's) and its initramfs made in a chroot on the host, at native speed.
   One-partition guests (vmware-like, lab-web01) are then made on the host at native speed:
   an MBR written here and ``mke2fs -d`` filling the partition from the tree; libguestfs only
   runs grub-install/grub-mkconfig inside the guest. LVM guests need device-mapper, which only
   the libguestfs appliance has here: libguestfs partitions, copies the tree in, installs GRUB.

The host part of a one-partition guest needs nothing but debootstrap and e2fsprogs, so
``scripts/demo`` starts it (``build --host-stage``) while the rest of the packages install.

Callers use :func:`build` (Python) or ``images/guests/build NAME`` (prints the image path).
Images are handed out read-only: tests put a qcow2 overlay on top and never write the base.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SUITE = "bookworm"
GUESTS = ("vmware-like", "lvm-static", "windows-phony", "agent-server", "lab-web01")
# A guest whose recipe starts from another's: that one's customize.sh runs first and its files
# are part of this guest's key. The demo's lab VM is vmware-like plus a writing workload.
BASE_RECIPE = {"lab-web01": "vmware-like"}
# One ext4 root partition on /dev/sda1: built on the host (mke2fs -d), GRUB by libguestfs.
PLAIN_LAYOUT = ("vmware-like", "lab-web01")
DISK_SIZE = 3 * 1024**3  # bytes; minbase + kernel + open-vm-tools fill ~700 MiB
BOOT_SIZE_MIB = 300  # separate /boot of lvm-static; two kernels + initramfs fit in 300 MiB
# Files that shape every Debian guest; a change to any of them rebuilds all of them.
COMMON_RECIPE = ("packages.txt", "common")
# Bump when a change to this file's build steps changes the images it makes (the layout
# constants below are hashed too); plain refactoring does not need to rebuild anything.
LAYOUT_VERSION = 2
# Bump when a change to the root tree's build (not packages.txt or rootfs.sh) alters it.
ROOTFS_VERSION = 2


class BuildError(Exception):
    """An image could not be built; the message names the stage and the log to read."""


def cache_dir() -> Path:
    root = Path(os.environ.get("FERRYMAN_CACHE", "/var/cache/ferryman"))
    d = root / "images"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _hash_paths(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            h.update(str(f.relative_to(HERE)).encode())
            h.update(b"\0")
            h.update(f.read_bytes())
            h.update(b"\0")
    return h.hexdigest()[:16]


def recipe_key(name: str) -> str:
    """Hash of every file that goes into image ``name``."""
    paths = [HERE / p for p in COMMON_RECIPE if (HERE / p).exists()]
    paths += [HERE / r for r in _recipes(name)]
    layout = repr((LAYOUT_VERSION, DISK_SIZE, BOOT_SIZE_MIB, UUIDS.get(name)))
    return hashlib.sha256((_hash_paths(paths) + layout).encode()).hexdigest()[:16]


# Device nodes that package scripts in a chroot touch (systemd-tmpfiles, udev rules). In a
# container debootstrap bind-mounts the host's /dev into the chroot, so a postinst there
# gives /dev/kvm to the CHROOT's kvm gid, which on the host is another group (ssl-cert on
# these machines): libvirtd then re-probes qemu on every call. Put them back afterwards.
KVM_NODE = "/dev/kvm"
HOST_NODES = (KVM_NODE, "/dev/net/tun", "/dev/vhost-net", "/dev/vhost-vsock", "/dev/fuse")


def _kvm_gid() -> int | None:
    import grp

    try:
        return grp.getgrnam("kvm").gr_gid
    except KeyError:
        return None


@contextlib.contextmanager
def host_devices_kept() -> Iterator[None]:
    """Owner, group and mode of HOST_NODES as they were before the block, whatever it did.
    /dev/kvm goes to group kvm when the host has it, as udev (and scripts/lib.sh) would: set-up
    may fix the node while a build runs beside it (scripts/demo), and must not be undone."""
    saved = {}
    for node in HOST_NODES:
        with contextlib.suppress(OSError):
            st = os.stat(node)
            saved[node] = (st.st_uid, st.st_gid, st.st_mode & 0o7777)
    try:
        yield
    finally:
        kvm = _kvm_gid()
        if KVM_NODE in saved and kvm is not None:
            uid, _gid, mode = saved[KVM_NODE]
            saved[KVM_NODE] = (uid, kvm, mode)
        for node, (uid, gid, mode) in saved.items():
            with contextlib.suppress(OSError):
                st = os.stat(node)
                if (st.st_uid, st.st_gid, st.st_mode & 0o7777) != (uid, gid, mode):
                    os.chown(node, uid, gid)
                    os.chmod(node, mode)
                    log.warning("%s: changed by a chroot's package scripts; restored", node)


def _recipes(name: str) -> list[str]:
    """The recipe folders of guest ``name``, in the order their customize.sh runs."""
    base = BASE_RECIPE.get(name)
    return [*(_recipes(base) if base else []), name]


def _rootfs_key() -> str:
    files = _hash_paths([HERE / "packages.txt", HERE / "common" / "rootfs.sh"])
    return hashlib.sha256(f"{files}{ROOTFS_VERSION}".encode()).hexdigest()[:16]


def _debs_key() -> str:
    """The downloaded packages depend on packages.txt alone."""
    return _hash_paths([HERE / "packages.txt"])


def apt_mirror() -> str:
    """The Debian mirror apt already uses (deb822 sources first, then sources.list)."""
    candidates = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for src in candidates:
        for line in src.read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split()[1]
                if uri.rstrip("/").endswith("/debian"):
                    return uri
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and parts[1].rstrip("/").endswith("/debian"):
                return parts[1]
    return "http://deb.debian.org/debian"


def _run(cmd: list[str], logf: Path, **kw: object) -> None:
    log.debug("run %s", cmd)
    with logf.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        r = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, check=False, **kw)  # type: ignore[call-overload]
    if r.returncode != 0:
        raise BuildError(f"{cmd[0]} failed with status {r.returncode}; see {logf}")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    import fcntl

    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _packages() -> list[str]:
    lines = (HERE / "packages.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def rootfs_tarball() -> Path:
    """The Debian 12 minbase root tree with packages.txt installed, as a .tar (cached)."""
    cache = cache_dir()
    key = _rootfs_key()
    out = cache / f"rootfs-{SUITE}-{key}.tar"
    if out.exists():
        return out
    with _lock(cache / ".rootfs.lock"):
        if out.exists():
            return out
        logf = cache / f"rootfs-{SUITE}-{key}.log"
        logf.write_text("")
        debs = cache / f"debootstrap-{SUITE}-{_debs_key()}.tgz"
        include = ",".join(_packages())
        work = Path(tempfile.mkdtemp(prefix="ferryman-rootfs-", dir=cache))
        try:
            target = work / "root"
            if not debs.exists():
                _run(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        f"--include={include}",
                        f"--make-tarball={debs}.part",
                        SUITE,
                        str(work / "dl"),
                        apt_mirror(),
                    ],
                    logf,
                )
                os.rename(f"{debs}.part", debs)
            # INITRD=No: the kernel's postinst makes no initramfs here; every guest makes its
            # own (MODULES=list) after its recipe ran, so one made now would be thrown away.
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", INITRD="No")
            with host_devices_kept():
                _run(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        f"--include={include}",
                        f"--unpack-tarball={debs}",
                        SUITE,
                        str(target),
                        apt_mirror(),
                    ],
                    logf,
                    env=env,
                )
                _run(["bash", str(HERE / "common" / "rootfs.sh"), str(target)], logf, env=env)
            _run(["tar", "-C", str(target), "--numeric-owner", "-cf", f"{out}.part", "."], logf)
            os.rename(f"{out}.part", out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        # Trees and downloads of an older packages.txt or rootfs.sh: 0.7-1.4 GiB each.
        for old in [*cache.glob(f"rootfs-{SUITE}-*"), *cache.glob(f"debootstrap-{SUITE}-*")]:
            if old.is_file() and old not in (out, logf, debs):
                old.unlink(missing_ok=True)
    return out


# Fixed filesystem UUIDs: the images are reproducible and tests can name them.
UUIDS = {
    "vmware-like": {"root": "5e1f2a3b-0c4d-4e5f-8a9b-000000000001"},
    "lvm-static": {
        "root": "5e1f2a3b-0c4d-4e5f-8a9b-000000000002",
        "boot": "5e1f2a3b-0c4d-4e5f-8a9b-000000000003",
    },
    # Same LVM layout as lvm-static (vg0/root + /boot); the linux-agent tests' server.
    "agent-server": {
        "root": "5e1f2a3b-0c4d-4e5f-8a9b-000000000004",
        "boot": "5e1f2a3b-0c4d-4e5f-8a9b-000000000005",
    },
    "lab-web01": {"root": "5e1f2a3b-0c4d-4e5f-8a9b-000000000006"},
}


def _guest_tree(name: str, work: Path, logf: Path) -> Path:
    """Unpack the rootfs and apply the common and guest recipes on the host."""
    tree = work / "tree"
    tree.mkdir(mode=0o755)
    tree.chmod(0o755)  # the root directory of the guest
    _run(["tar", "-C", str(tree), "--numeric-owner", "-xf", str(rootfs_tarball())], logf)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["bash", str(HERE / "common" / "customize.sh"), str(tree)], logf, env=env)
    for recipe in _recipes(name):
        _run(["bash", str(HERE / recipe / "customize.sh"), str(tree)], logf, env=env)
    _run(["bash", str(HERE / "common" / "initramfs.sh"), str(tree)], logf, env=env)
    return tree


def _guest_tree_tar(name: str, work: Path, logf: Path) -> Path:
    """The customised tree, packed for libguestfs's tar_in."""
    tree = _guest_tree(name, work, logf)
    out = work / "tree.tar"
    _run(["tar", "-C", str(tree), "--numeric-owner", "-cf", str(out), "."], logf)
    shutil.rmtree(tree)
    return out


def _guestfs_handle(disk: Path) -> object:
    import guestfs

    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend(os.environ.get("LIBGUESTFS_BACKEND", "direct"))
    g.add_drive_opts(str(disk), format="qcow2", readonly=False)
    g.launch()
    return g


def _shut_down(g: object) -> None:
    """Flush, unmount and stop the appliance: a write not synced before close is lost."""
    g.sync()  # type: ignore[attr-defined]
    g.umount_all()  # type: ignore[attr-defined]
    g.shutdown()  # type: ignore[attr-defined]


def _install_grub(g: object, logf: Path) -> None:
    for cmd in (
        ["grub-install", "--target=i386-pc", "/dev/sda"],
        ["grub-mkconfig", "-o", "/boot/grub/grub.cfg"],
    ):
        out = g.command(cmd)  # type: ignore[attr-defined]
        with logf.open("a") as f:
            f.write(f"\n$ (guest) {' '.join(cmd)}\n{out}\n")


SECTOR = 512
PART_START = 2048  # sectors: the 1 MiB alignment fdisk and libguestfs's part_add use


def _mbr(disk_size: int, signature: int) -> bytes:
    """A DOS partition table: one bootable Linux partition from 1 MiB to the end of the disk.
    The boot code area stays empty: grub-install writes it."""
    sectors = disk_size // SECTOR - PART_START
    # CHS of LBA 2048 in the 255-head, 63-sector geometry fdisk uses; the end is past CHS's
    # reach, written as 1023/254/63 as fdisk does. Nothing reads CHS, but tools compare it.
    head, sector = divmod(PART_START, 63)
    chs_start = bytes((head, sector + 1, 0))
    entry = struct.pack("<B3sB3sII", 0x80, chs_start, 0x83, b"\xfe\xff\xff", PART_START, sectors)
    mbr = bytearray(SECTOR)
    mbr[0x1B8:0x1BC] = struct.pack("<I", signature)
    mbr[0x1BE:0x1CE] = entry
    mbr[0x1FE:0x200] = b"\x55\xaa"
    return bytes(mbr)


def _host_disk(raw: Path, tree: Path, uuid: str, size: int, logf: Path) -> None:
    """A one-partition disk made on the host at native speed: the MBR, then mke2fs filling
    the partition from ``tree`` (-d keeps owners, modes, links, xattrs). Not bootable yet:
    see _install_grub_on. The disk signature is the UUID's last 8 hex digits."""
    with raw.open("wb") as f:
        f.truncate(size)
        f.write(_mbr(size, int(uuid[-8:], 16)))
    block = 4096
    _run(
        [
            "mke2fs", "-q", "-F", "-t", "ext4", "-b", str(block), "-U", uuid, "-L", "root",
            "-E", f"offset={PART_START * SECTOR}", "-d", str(tree),
            str(raw), str((size - PART_START * SECTOR) // block),
        ],
        logf,
    )  # fmt: skip


def _install_grub_on(raw: Path, out: Path, logf: Path) -> None:
    """Copy the host-made disk into a qcow2 and install GRUB inside it (grub-install needs the
    disk as a device, which only the libguestfs appliance gives here)."""
    _run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out)], logf)
    g = _guestfs_handle(out)
    try:
        g.mount("/dev/sda1", "/")  # type: ignore[attr-defined]
        _install_grub(g, logf)
        _shut_down(g)
    finally:
        g.close()  # type: ignore[attr-defined]


def _build_debian(name: str, out: Path, work: Path, logf: Path) -> None:
    """An LVM guest: libguestfs partitions, makes the volumes and filesystems, copies the tree."""
    import guestfs

    tar = _guest_tree_tar(name, work, logf)
    disk = work / "disk.qcow2"
    guestfs.GuestFS().disk_create(str(disk), "qcow2", DISK_SIZE)
    g = _guestfs_handle(disk)
    uuids = UUIDS[name]
    try:
        g.part_init("/dev/sda", "mbr")  # type: ignore[attr-defined]
        boot_end = 2048 + BOOT_SIZE_MIB * 2048 - 1
        g.part_add("/dev/sda", "p", 2048, boot_end)  # type: ignore[attr-defined]
        g.part_add("/dev/sda", "p", boot_end + 1, -1)  # type: ignore[attr-defined]
        g.part_set_bootable("/dev/sda", 1, True)  # type: ignore[attr-defined]
        g.part_set_mbr_id("/dev/sda", 2, 0x8E)  # type: ignore[attr-defined]
        g.pvcreate("/dev/sda2")  # type: ignore[attr-defined]
        g.vgcreate("vg0", ["/dev/sda2"])  # type: ignore[attr-defined]
        g.lvcreate_free("root", "vg0", 100)  # type: ignore[attr-defined]
        g.mke2fs("/dev/vg0/root", fstype="ext4", uuid=uuids["root"], label="root")  # type: ignore[attr-defined]
        g.mke2fs("/dev/sda1", fstype="ext4", uuid=uuids["boot"], label="boot")  # type: ignore[attr-defined]
        g.mount("/dev/vg0/root", "/")  # type: ignore[attr-defined]
        g.mkdir("/boot")  # type: ignore[attr-defined]
        g.mount("/dev/sda1", "/boot")  # type: ignore[attr-defined]
        g.tar_in(str(tar), "/")  # type: ignore[attr-defined]
        _install_grub(g, logf)
        _shut_down(g)
    finally:
        g.close()  # type: ignore[attr-defined]
    os.rename(disk, out)


def _build_windows(out: Path, work: Path, logf: Path) -> None:
    """libguestfs's phony Windows: NTFS, SOFTWARE and SYSTEM hives, a PE32+ cmd.exe."""
    import guestfs

    sys_path = str(HERE / "windows-phony")
    import importlib.util

    spec = importlib.util.spec_from_file_location("minhive", f"{sys_path}/minhive.py")
    assert spec and spec.loader
    minhive = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(minhive)
    hives = {}
    for hive, prefix in (
        ("SOFTWARE", "HKEY_LOCAL_MACHINE\\SOFTWARE"),
        ("SYSTEM", "HKEY_LOCAL_MACHINE\\SYSTEM"),
    ):
        path = work / hive
        path.write_bytes(minhive.minimal_hive())
        _run(
            [
                "hivexregedit",
                "--merge",
                str(path),
                "--prefix",
                prefix,
                str(HERE / "windows-phony" / f"{hive.lower()}.reg"),
            ],
            logf,
        )
        hives[hive] = path
    exe = work / "cmd.exe"
    exe.write_bytes(minhive.minimal_pe64())
    disk = work / "disk.qcow2"
    guestfs.GuestFS().disk_create(str(disk), "qcow2", 1024**3)
    g = _guestfs_handle(disk)
    try:
        g.part_init("/dev/sda", "mbr")  # type: ignore[attr-defined]
        g.part_add("/dev/sda", "p", 2048, 206847)  # type: ignore[attr-defined]
        g.part_add("/dev/sda", "p", 206848, -1)  # type: ignore[attr-defined]
        g.part_set_bootable("/dev/sda", 1, True)  # type: ignore[attr-defined]
        g.part_set_mbr_id("/dev/sda", 1, 0x07)  # type: ignore[attr-defined]
        g.part_set_mbr_id("/dev/sda", 2, 0x07)  # type: ignore[attr-defined]
        # Disk signature that the SYSTEM hive's MountedDevices entry for C: names.
        g.pwrite_device("/dev/sda", b"1234", 0x1B8)  # type: ignore[attr-defined]
        g.mkfs("ntfs", "/dev/sda1", label="System Reserved")  # type: ignore[attr-defined]
        g.mkfs("ntfs", "/dev/sda2", label="Windows")  # type: ignore[attr-defined]
        g.mount("/dev/sda2", "/")  # type: ignore[attr-defined]
        g.mkdir_p("/Windows/System32/Config")  # type: ignore[attr-defined]
        g.mkdir_p("/Windows/System32/Drivers")  # type: ignore[attr-defined]
        g.mkdir_p("/Windows/Temp")  # type: ignore[attr-defined]
        g.mkdir_p("/Program Files")  # type: ignore[attr-defined]
        g.mkdir_p("/ProgramData")  # type: ignore[attr-defined]
        for hive, path in hives.items():
            g.upload(str(path), f"/Windows/System32/Config/{hive}")  # type: ignore[attr-defined]
        g.upload(str(exe), "/Windows/System32/cmd.exe")  # type: ignore[attr-defined]
        g.touch("/autoexec.bat")  # type: ignore[attr-defined]
        _shut_down(g)
    finally:
        g.close()  # type: ignore[attr-defined]
    os.rename(disk, out)


def image_path(name: str) -> Path:
    """Where image ``name`` of the current recipe lives (whether built or not)."""
    if name not in GUESTS:
        raise BuildError(f"unknown test guest {name!r}; known: {', '.join(GUESTS)}")
    return cache_dir() / f"{name}-{recipe_key(name)}.qcow2"


def build(name: str, host_stage: bool = False) -> Path:
    """Return the cached image of guest ``name``, building it first if its recipe changed.

    The file is left read-only: put an overlay on it (qemu-img create -b IMG -F qcow2).
    ``host_stage``: for a one-partition guest, only make (and cache) the part that needs no
    libguestfs, the partitioned raw disk without a bootloader, and return its path; the next
    ``build`` finishes from there. ``scripts/demo`` runs it while packages still install.
    """
    out = image_path(name)
    if out.exists():
        return out
    cache = cache_dir()
    with _lock(cache / f".{name}.lock"):
        if out.exists():
            return out
        logf = out.with_suffix(".log")
        host_raw = out.with_suffix(".host.raw")
        if not host_raw.exists():
            logf.write_text("")
        t0 = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix=f"ferryman-{name}-", dir=cache))
        try:
            part = work / "image.qcow2"
            if name == "windows-phony":
                _build_windows(part, work, logf)
            elif name in PLAIN_LAYOUT:
                if not host_raw.exists():
                    tree = _guest_tree(name, work, logf)
                    _host_disk(work / "disk.raw", tree, UUIDS[name]["root"], DISK_SIZE, logf)
                    shutil.rmtree(tree)
                    os.rename(work / "disk.raw", host_raw)
                    log.info("host stage of %s in %.0f s", name, time.monotonic() - t0)
                if host_stage:
                    return host_raw
                _install_grub_on(host_raw, part, logf)
            else:
                _build_debian(name, part, work, logf)
            part.chmod(0o444)
            os.rename(part, out)
            host_raw.unlink(missing_ok=True)
        except BuildError:
            raise
        except Exception as e:
            raise BuildError(f"building test guest {name} failed: {e}; see {logf}") from e
        finally:
            shutil.rmtree(work, ignore_errors=True)
        log.info("built %s in %.0f s: %s", name, time.monotonic() - t0, out)
        # Older builds of the same guest are superseded by this recipe. "NAME-<hex key>." only:
        # another guest's name may start with this one's.
        for old in cache.glob(f"{name}-*"):
            key = old.name[len(name) + 1 :].split(".")[0]
            if old not in (out, logf) and old.is_file() and "-" not in key:
                old.unlink(missing_ok=True)
    return out
