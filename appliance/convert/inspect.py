"""Inspect a guest disk with libguestfs: what the preflight and the converter decide from.

The result is a dataclass that serialises to JSON (``Inspection.to_dict``), stored per restore
point by the engine and shown by CLI and TUI. Everything is read inside the libguestfs
appliance; the only bytes that reach the host are small files (the initramfs, to list it).
"""

from __future__ import annotations

import copy
import logging
import posixpath
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from appliance.convert import initramfs, linuxconf
from appliance.convert.errors import DamagedDisk, InspectError
from appliance.convert.files import GuestFiles, GuestfsFiles, glob
from appliance.convert.gfs import DEFAULT_TIMEOUT, guarded, open_disks

log = logging.getLogger(__name__)

# GPT partition types and the MBR id of Windows dynamic disks (LDM): not convertible.
LDM_GPT_TYPES = {"5808C8AA-7E8F-42E0-85D2-E1E90434CFB3", "AF9B60A0-1431-4F62-BC68-3311714A69AD"}
LDM_MBR_ID = 0x42
WINDOWS_VIRTIO_SERVICES = ("viostor", "vioscsi", "netkvm", "balloon", "vioser")
WINDOWS_VMWARE_SERVICES = ("vmci", "vmhgfs", "vmmouse", "vmxnet3ndis6", "VMTools", "pvscsi")


@dataclass
class KernelInfo:
    version: str
    vmlinuz: str
    initrd: str | None
    modules: list[str]  # virtio drivers present as modules or built into the kernel
    initrd_modules: list[str]  # virtio drivers inside the initramfs (or built in)
    default: bool = False

    @property
    def has_virtio(self) -> bool:
        return {"virtio_blk", "virtio_pci"} <= set(self.modules) or "virtio_blk" in self.modules

    @property
    def initrd_has_virtio(self) -> bool:
        return "virtio_blk" in self.initrd_modules or "virtio_scsi" in self.initrd_modules


@dataclass
class FilesystemInfo:
    device: str
    fstype: str
    uuid: str | None = None
    label: str | None = None
    size: int | None = None  # bytes, when mounted
    free: int | None = None  # bytes available to unprivileged users, when mounted


@dataclass
class WindowsInfo:
    systemroot: str
    control_set: str
    product_variant: str
    virtio_services: list[str] = field(default_factory=list)
    vmware_services: list[str] = field(default_factory=list)
    dynamic_disks: bool = False


@dataclass
class Inspection:
    image: str
    os_type: str  # linux | windows | unknown
    distro: str
    family: str  # debian | rhel | suse | arch | windows | unknown
    product_name: str
    major: int
    minor: int
    arch: str
    hostname: str
    package_format: str
    root_device: str | None
    mountpoints: dict[str, str]
    firmware: str  # bios | uefi
    bootloader: str | None  # grub2 | grub-legacy | extlinux | systemd-boot | windows | None
    grub_cfg: str | None
    kernel_cmdline: str | None
    kernels: list[KernelInfo]
    fstab: list[linuxconf.FstabEntry]
    network: list[linuxconf.NetworkConfig]
    hypervisor_tools: list[str]  # "open-vm-tools (vmware)", ...
    filesystems: list[FilesystemInfo]
    luks: list[str]  # LUKS devices
    luks_locked: list[str]  # LUKS devices without a key
    lvm: bool
    dynamic_disks: bool
    windows: WindowsInfo | None
    free_root: int | None  # bytes
    free_boot: int | None  # bytes, when /boot is separate
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, kd in zip(self.kernels, d["kernels"], strict=True):
            kd["has_virtio"] = k.has_virtio
            kd["initrd_has_virtio"] = k.initrd_has_virtio
        return d

    @property
    def default_kernel(self) -> KernelInfo | None:
        for k in self.kernels:
            if k.default:
                return k
        return self.kernels[0] if self.kernels else None


def inspect_image(
    image: Path,
    *,
    fmt: str = "qcow2",
    keys: dict[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    extra_disks: list[Path] | None = None,
) -> Inspection:
    """Inspect ``image`` (read-only). ``keys`` maps LUKS devices (/dev/sda2) to passphrases.

    Raises DamagedDisk when the disk has nothing readable or the appliance hangs past
    ``timeout`` seconds; InspectError for other libguestfs failures.
    """
    t0 = time.monotonic()
    disks = [image, *(extra_disks or [])]
    with (
        open_disks(disks, readonly=True, fmt=fmt, timeout=timeout) as g,
        guarded(g, timeout, f"inspection of {image}") as wd,
    ):
        try:
            result = inspect_handle(g, image=str(image), keys=keys)
        except RuntimeError as e:
            if wd.fired:
                raise DamagedDisk(
                    f"inspection of {image} did not finish within {timeout:.0f} s",
                    hint="the disk may be damaged or hostile; pick an earlier restore point",
                ) from e
            raise InspectError(
                f"libguestfs failed while inspecting {image}: {e}",
                hint="the disk may be damaged; check it with qemu-img check",
            ) from e
    result.seconds = round(time.monotonic() - t0, 1)
    return result


def _blkid(g: Any, dev: str) -> dict[str, str]:
    try:
        return dict(g.blkid(dev))
    except RuntimeError:
        return {}


def _filesystems(g: Any) -> list[FilesystemInfo]:
    """File systems with UUID and label: one blkid per device (each call is a process in the
    appliance, which costs ~0.5 s under TCG, so no separate vfs_uuid/vfs_label calls)."""
    out = []
    for dev, fstype in sorted(g.list_filesystems().items()):
        fi = FilesystemInfo(device=dev, fstype=fstype)
        if fstype not in ("unknown",):
            info = _blkid(g, dev)
            fi.uuid = info.get("UUID") or None
            fi.label = info.get("LABEL") or None
        out.append(fi)
    return out


def _dynamic_disks(g: Any) -> bool:
    """Windows dynamic disks (LDM): told by the partition type blkid reports."""
    for part in g.list_partitions():
        ptype = _blkid(g, part).get("PART_ENTRY_TYPE", "").upper()
        if ptype in ("0X42",) or ptype in LDM_GPT_TYPES:
            return True
    return False


def _open_luks(
    g: Any, fss: list[FilesystemInfo], keys: dict[str, str]
) -> tuple[list[str], list[str]]:
    luks = [f.device for f in fss if f.fstype == "crypto_LUKS"]
    locked = []
    for n, dev in enumerate(luks):
        key = keys.get(dev)
        if key is None:
            locked.append(dev)
            continue
        try:
            g.cryptsetup_open(dev, key, f"ferryman_luks{n}")
        except RuntimeError as e:
            raise InspectError(
                f"the key given for LUKS device {dev} does not open it: {e}",
                hint="check the passphrase in the machine's settings",
            ) from e
    if len(locked) < len(luks):
        g.lvm_scan(True)
    return luks, locked


def inspect_handle(
    g: Any, *, image: str, keys: dict[str, str] | None = None, writable: bool = False
) -> Inspection:
    """Inspect a launched handle; leaves the guest's file systems mounted (read-only unless
    ``writable``, which the converter uses on its overlay)."""
    fss = _filesystems(g)
    luks, locked = _open_luks(g, fss, keys or {})
    if len(locked) < len(luks):
        fss = _filesystems(g)
    lvm = bool(g.lvs())
    dynamic = _dynamic_disks(g)
    roots = g.inspect_os()
    if not roots:
        readable = [f for f in fss if f.fstype not in ("unknown", "swap", "crypto_LUKS")]
        if not readable and not luks and not dynamic:
            raise DamagedDisk(
                f"{image} has no readable partition table or file system",
                hint="the disk is damaged or empty; pick an earlier restore point",
            )
        return Inspection(
            image=image,
            os_type="unknown",
            distro="unknown",
            family="unknown",
            product_name="",
            major=0,
            minor=0,
            arch="",
            hostname="",
            package_format="",
            root_device=None,
            mountpoints={},
            firmware="bios",
            bootloader=None,
            grub_cfg=None,
            kernel_cmdline=None,
            kernels=[],
            fstab=[],
            network=[],
            hypervisor_tools=[],
            filesystems=fss,
            luks=luks,
            luks_locked=locked,
            lvm=lvm,
            dynamic_disks=dynamic,
            windows=None,
            free_root=None,
            free_boot=None,
        )
    root = roots[0]
    os_type = g.inspect_get_type(root)
    distro = g.inspect_get_distro(root)
    mountpoints: dict[str, str] = g.inspect_get_mountpoints(root)
    for mp in sorted(mountpoints, key=len):
        try:
            (g.mount if writable else g.mount_ro)(mountpoints[mp], mp)
        except RuntimeError as e:
            log.warning("cannot mount %s on %s: %s", mountpoints[mp], mp, e)
    files = GuestfsFiles(g)
    insp = Inspection(
        image=image,
        os_type=os_type,
        distro=distro,
        family="windows" if os_type == "windows" else linuxconf.family_of(distro),
        product_name=g.inspect_get_product_name(root),
        major=int(g.inspect_get_major_version(root)),
        minor=int(g.inspect_get_minor_version(root)),
        arch=g.inspect_get_arch(root),
        hostname=g.inspect_get_hostname(root),
        package_format=g.inspect_get_package_format(root),
        root_device=root,
        mountpoints=mountpoints,
        firmware="uefi" if _is_uefi(g, files) else "bios",
        bootloader=None,
        grub_cfg=None,
        kernel_cmdline=None,
        kernels=[],
        fstab=[],
        network=[],
        hypervisor_tools=_hypervisor_tools(g, root, files),
        filesystems=fss,
        luks=luks,
        luks_locked=locked,
        lvm=lvm,
        dynamic_disks=dynamic,
        windows=None,
        free_root=_free(g, "/"),
        free_boot=_free(g, "/boot") if "/boot" in mountpoints else None,
    )
    for f in insp.filesystems:
        for mp, dev in mountpoints.items():
            if dev == f.device:
                f.free = _free(g, mp)
                try:
                    st = g.statvfs(mp)
                    f.size = int(st["blocks"]) * int(st["frsize"])
                except RuntimeError:
                    pass
    if os_type == "linux":
        _inspect_linux(g, files, insp)
    elif os_type == "windows":
        insp.bootloader = "windows"
        insp.windows = _inspect_windows(g, root, dynamic)
    return insp


def _free(g: Any, path: str) -> int | None:
    try:
        st = g.statvfs(path)
    except RuntimeError:
        return None
    return int(st["bavail"]) * int(st["bsize"])


def _is_uefi(g: Any, files: GuestFiles) -> bool:
    return bool(glob(files, "/boot/efi/EFI/*")) or bool(glob(files, "/EFI/*"))


def _hypervisor_tools(g: Any, root: str, files: GuestFiles) -> list[str]:
    found = []
    try:
        apps = g.inspect_list_applications2(root)
    except RuntimeError as e:
        log.warning("cannot list applications: %s", e)
        apps = []
    for app in apps:
        name = app.get("app2_name", "")
        display = app.get("app2_display_name", "")
        for candidate in (name, display):
            hv = linuxconf.HYPERVISOR_TOOL_PACKAGES.get(candidate)
            if hv:
                found.append(f"{name} ({hv})")
                break
    for path, hv in linuxconf.HYPERVISOR_TOOL_FILES.items():
        if files.exists(path):
            found.append(f"{path} ({hv})")
    return sorted(set(found))


def _inspect_linux(g: Any, files: GuestFiles, insp: Inspection) -> None:
    for cfg, kind in (
        ("/boot/grub/grub.cfg", "grub2"),
        ("/boot/grub2/grub.cfg", "grub2"),
        ("/boot/grub/menu.lst", "grub-legacy"),
        ("/boot/extlinux/extlinux.conf", "extlinux"),
        ("/boot/syslinux/syslinux.cfg", "extlinux"),
        ("/boot/loader/loader.conf", "systemd-boot"),
    ):
        if files.exists(cfg):
            insp.bootloader, insp.grub_cfg = kind, cfg
            break
    if insp.bootloader is None:
        efi = glob(files, "/boot/efi/EFI/*/grub.cfg")
        if efi:
            insp.bootloader, insp.grub_cfg = "grub2", efi[0]
    default_kernel = None
    if insp.grub_cfg and insp.bootloader == "grub2":
        kernel, _initrd, cmdline = linuxconf.grub_cfg_default_entry(files.read(insp.grub_cfg))
        insp.kernel_cmdline = cmdline
        default_kernel = kernel
    bls = glob(files, "/boot/loader/entries/*.conf")
    if insp.kernel_cmdline is None and bls:
        m = re.search(r"^options\s+(.*)$", files.read(bls[-1]), re.M)
        insp.kernel_cmdline = m.group(1) if m else None
    insp.kernels = _kernels(g, files, default_kernel)
    if files.exists("/etc/fstab"):
        insp.fstab = linuxconf.parse_fstab(files.read("/etc/fstab"))
        _resolve_fstab(g, insp)
    insp.network = linuxconf.network_configs(files)


def _kernels(g: Any, files: GuestFiles, default_path: str | None) -> list[KernelInfo]:
    out = []
    for vmlinuz in glob(files, "/boot/vmlinuz-*"):
        version = vmlinuz.split("vmlinuz-", 1)[1]
        moddir = f"/lib/modules/{version}"
        if not files.is_dir(moddir):
            continue
        modules = set()
        for index in ("modules.dep", "modules.builtin"):
            p = f"{moddir}/{index}"
            if files.exists(p):
                for line in files.read(p).splitlines():
                    path = line.split(":", 1)[0]
                    base = posixpath.basename(path).split(".ko", 1)[0].replace("-", "_")
                    if base.startswith("virtio"):
                        modules.add(base)
        builtin = _builtin_virtio(files, version)
        initrd = None
        for cand in (
            f"/boot/initrd.img-{version}",
            f"/boot/initramfs-{version}.img",
            f"/boot/initrd-{version}",
        ):
            if files.exists(cand):
                initrd = cand
                break
        in_initrd = set(builtin)
        if initrd:
            in_initrd |= set(_initrd_virtio(g, initrd))
        is_default = bool(default_path) and (
            default_path is not None and default_path.endswith(f"vmlinuz-{version}")
        )
        out.append(
            KernelInfo(
                version=version,
                vmlinuz=vmlinuz,
                initrd=initrd,
                modules=sorted(modules),
                initrd_modules=sorted(in_initrd),
                default=is_default,
            )
        )
    out.sort(key=lambda k: _version_key(k.version), reverse=True)
    if out and not any(k.default for k in out):
        out[0].default = True
    return out


def _builtin_virtio(files: GuestFiles, version: str) -> set[str]:
    path = f"/lib/modules/{version}/modules.builtin"
    found = set()
    if files.exists(path):
        for line in files.read(path).splitlines():
            base = posixpath.basename(line).split(".ko", 1)[0].replace("-", "_")
            if base.startswith("virtio"):
                found.add(base)
    return found


def _version_key(v: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", v)]


def _initrd_virtio(g: Any, path: str) -> list[str]:
    with tempfile.NamedTemporaryFile(prefix="ferryman-initrd-") as tmp:
        g.download(path, tmp.name)
        try:
            names = initramfs.list_file(Path(tmp.name))
        except ValueError as e:
            log.warning("cannot list initramfs %s: %s", path, e)
            return []
    return initramfs.virtio_in(names)


def _resolve_fstab(g: Any, insp: Inspection) -> None:
    by_uuid = {f.uuid: f.device for f in insp.filesystems if f.uuid}
    by_label = {f.label: f.device for f in insp.filesystems if f.label}
    devices = {f.device for f in insp.filesystems}
    lv_paths = {}
    for lv in g.lvs():  # /dev/vg0/root
        vg, name = lv.split("/")[2:4]
        lv_paths[f"/dev/mapper/{vg.replace('-', '--')}-{name.replace('-', '--')}"] = lv
        lv_paths[lv] = lv
    for e in insp.fstab:
        spec = e.spec
        if spec.startswith("UUID="):
            e.resolved = by_uuid.get(spec[5:].strip('"'))
        elif spec.startswith("LABEL="):
            e.resolved = by_label.get(spec[6:].strip('"'))
        elif spec in lv_paths:
            e.resolved = lv_paths[spec]
        elif spec in devices:
            e.resolved = spec
        elif spec.startswith("/dev/disk/by-uuid/"):
            e.resolved = by_uuid.get(spec.rsplit("/", 1)[1])
        elif spec.startswith("PARTUUID=") or spec.startswith("/dev/disk/by-partuuid/"):
            want = spec.split("=", 1)[-1].rsplit("/", 1)[-1].lower()
            for dev in devices:
                try:
                    if g.blkid(dev).get("PART_ENTRY_UUID", "").lower() == want:
                        e.resolved = dev
                except RuntimeError:
                    continue
        elif e.fstype in ("proc", "sysfs", "tmpfs", "devpts", "none", "nfs", "cifs", "nfs4"):
            e.resolved = e.fstype


def _inspect_windows(g: Any, root: str, dynamic: bool) -> WindowsInfo:
    info = WindowsInfo(
        systemroot=g.inspect_get_windows_systemroot(root),
        control_set=g.inspect_get_windows_current_control_set(root),
        product_variant=g.inspect_get_product_variant(root),
        dynamic_disks=dynamic,
    )
    hive = g.inspect_get_windows_system_hive(root)
    services = set()
    try:
        g.hivex_open(hive)
        node = g.hivex_root()
        for part in (info.control_set, "Services"):
            node = g.hivex_node_get_child(node, part)
            if not node:
                break
        if node:
            services = {g.hivex_node_name(c["hivex_node_h"]) for c in g.hivex_node_children(node)}
    finally:
        g.hivex_close()
    lower = {s.lower(): s for s in services}
    info.virtio_services = sorted(lower[s] for s in WINDOWS_VIRTIO_SERVICES if s in lower)
    info.vmware_services = sorted(
        lower[s.lower()] for s in WINDOWS_VMWARE_SERVICES if s.lower() in lower
    )
    return info


def refresh(g: Any, before: Inspection) -> Inspection:
    """What a conversion can change, read again on the same (still mounted) handle.

    Cheaper than a second inspection (no inspect_os, one initramfs listing): verification
    right after conversion costs seconds, not a second launch.
    """
    after = copy.deepcopy(before)
    files = GuestfsFiles(g)
    if after.os_type != "linux":
        return after
    if after.grub_cfg and files.exists(after.grub_cfg):
        _kernel, _initrd, after.kernel_cmdline = linuxconf.grub_cfg_default_entry(
            files.read(after.grub_cfg)
        )
    for k in after.kernels:
        if k.default and k.initrd and files.exists(k.initrd):
            builtin = _builtin_virtio(files, k.version)
            k.initrd_modules = sorted(builtin | set(_initrd_virtio(g, k.initrd)))
    if files.exists("/etc/fstab"):
        after.fstab = linuxconf.parse_fstab(files.read("/etc/fstab"))
        _resolve_fstab(g, after)
    after.network = linuxconf.network_configs(files)
    if after.root_device:
        after.hypervisor_tools = _hypervisor_tools(g, after.root_device, files)
    return after
