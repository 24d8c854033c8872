"""The built-in Linux converter: make a guest that ran on VMware/Hyper-V boot on KVM virtio.

One libguestfs launch on a writable overlay does all of it:

1. remove the other hypervisor's guest tools with the guest's package manager;
2. put the virtio drivers into the initramfs of the kernel that boots, with the guest's own
   tool (update-initramfs, dracut, mkinitcpio), after adding them to its configuration so that
   later rebuilds in the guest keep them;
3. device names (/dev/sda1) in fstab and on the kernel line to UUID=;
4. serial console on the kernel line; drop MAC bindings of the network configuration;
5. regenerate the grub configuration with the guest's grub-mkconfig.

Why only one kernel, and two initramfs strategies: the initramfs rebuild is where virt-v2v
spends half of its time under TCG (design.md). Only the boot kernel's image is touched. For
initramfs-tools guests the default appends a small cpio with the virtio modules (seconds);
the guest's own update-initramfs / dracut / mkinitcpio is the other strategy and the only one
for dracut and mkinitcpio guests. Measured figures and reasons: appliance/convert/README.md.

The decisions (which files to edit, which commands to run) are separated from their execution
so that unit tests check them on file trees for every family.
"""

from __future__ import annotations

import logging
import re
import shlex
from dataclasses import dataclass
from typing import Any

from appliance.convert import linuxconf
from appliance.convert.errors import ConversionFailed
from appliance.convert.files import GuestFiles, glob
from appliance.convert.inspect import Inspection, KernelInfo

log = logging.getLogger(__name__)

INITRAMFS_VIRTIO = ("virtio_pci", "virtio_blk", "virtio_scsi")
GUEST_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass
class GuestCommand:
    argv: list[str]
    why: str

    def shell(self) -> str:
        return f"export PATH={GUEST_PATH} DEBIAN_FRONTEND=noninteractive; {shlex.join(self.argv)}"


def tool_packages(insp: Inspection) -> list[str]:
    """Package names of hypervisor tools found by inspection ("open-vm-tools (vmware)")."""
    return [t.split(" (", 1)[0] for t in insp.hypervisor_tools if not t.startswith("/")]


def remove_tools_command(insp: Inspection) -> GuestCommand | None:
    pkgs = tool_packages(insp)
    if not pkgs:
        return None
    if insp.package_format == "deb":
        return GuestCommand(["dpkg", "--purge", *pkgs], f"remove {', '.join(pkgs)}")
    if insp.package_format == "rpm":
        return GuestCommand(["rpm", "-e", "--nodeps", *pkgs], f"remove {', '.join(pkgs)}")
    if insp.package_format == "pacman":
        return GuestCommand(["pacman", "-Rns", "--noconfirm", *pkgs], f"remove {', '.join(pkgs)}")
    return None


def boot_kernel(insp: Inspection) -> KernelInfo | None:
    """The kernel that will boot: the default one if it has virtio, else the newest that has."""
    k = insp.default_kernel
    if k is not None and k.has_virtio:
        return k
    for cand in insp.kernels:
        if cand.has_virtio:
            return cand
    return None


def configure_initramfs(
    files: GuestFiles, insp: Inspection, kernel: KernelInfo
) -> tuple[list[str], list[GuestCommand]]:
    """Add the virtio drivers to the guest's initramfs configuration; the rebuild command."""
    changes: list[str] = []
    fam = insp.family
    if fam == "debian":
        path = "/etc/initramfs-tools/modules"
        text = files.read(path) if files.exists(path) else ""
        present = {ln.split()[0] for ln in text.splitlines() if ln.strip() and ln[0] != "#"}
        add = [m for m in INITRAMFS_VIRTIO if m not in present]
        if add:
            text = text.rstrip("\n") + "\n# KVM virtio (added by Ferryman)\n" + "\n".join(add)
            files.write(path, text + "\n")
            changes.append(f"initramfs: {', '.join(add)} added to {path}")
        return changes, [
            GuestCommand(
                ["update-initramfs", "-u", "-k", kernel.version],
                f"rebuild the initramfs of {kernel.version} with virtio",
            )
        ]
    if fam in ("rhel", "suse"):
        path = "/etc/dracut.conf.d/90-ferryman-virtio.conf"
        files.write(
            path,
            "# KVM virtio drivers, added by Ferryman's conversion\n"
            f'add_drivers+=" {" ".join(INITRAMFS_VIRTIO)} "\n',
        )
        changes.append(f"initramfs: {path} adds {', '.join(INITRAMFS_VIRTIO)}")
        initrd = kernel.initrd or (
            f"/boot/initramfs-{kernel.version}.img"
            if fam == "rhel"
            else f"/boot/initrd-{kernel.version}"
        )
        return changes, [
            GuestCommand(
                ["dracut", "--force", "--no-hostonly-cmdline", initrd, kernel.version],
                f"rebuild {initrd} with virtio",
            )
        ]
    if fam == "arch":
        path = "/etc/mkinitcpio.conf"
        text = files.read(path) if files.exists(path) else "MODULES=()\n"
        m = re.search(r"^MODULES=\((.*?)\)", text, re.M)
        have = m.group(1).split() if m else []
        want = have + [x for x in INITRAMFS_VIRTIO if x not in have]
        line = f"MODULES=({' '.join(want)})"
        text = re.sub(r"^MODULES=\(.*?\)", line, text, flags=re.M) if m else f"{line}\n{text}"
        files.write(path, text)
        changes.append(f"initramfs: {path} {line}")
        return changes, [GuestCommand(["mkinitcpio", "-P"], "rebuild the initramfs with virtio")]
    raise ConversionFailed(
        f"{insp.hostname}: no initramfs tool known for family {fam!r}",
        hint="use the virt-v2v backend for this machine",
    )


def grub_commands(files: GuestFiles, insp: Inspection) -> list[GuestCommand]:
    cfg = insp.grub_cfg or "/boot/grub/grub.cfg"
    if insp.family == "debian" and (
        files.exists("/usr/sbin/update-grub") or files.exists("/sbin/update-grub")
    ):
        return [GuestCommand(["update-grub"], "regenerate the grub configuration")]
    tool = "grub2-mkconfig" if cfg.startswith("/boot/grub2") or insp.family != "debian" else None
    if tool is None or not (files.exists(f"/usr/sbin/{tool}") or files.exists(f"/sbin/{tool}")):
        tool = "grub-mkconfig"
    return [GuestCommand([tool, "-o", cfg], f"regenerate {cfg}")]


def uuid_map(insp: Inspection) -> dict[str, str]:
    return {f.device: f.uuid for f in insp.filesystems if f.uuid}


def edit_configuration(files: GuestFiles, insp: Inspection) -> list[str]:
    """fstab and kernel line to UUIDs, serial console, MAC bindings dropped (text edits only)."""
    changes: list[str] = []
    uuids = uuid_map(insp)
    if files.exists("/etc/fstab"):
        text, ch = linuxconf.rewrite_fstab(files.read("/etc/fstab"), uuids)
        if ch:
            files.write("/etc/fstab", text)
            changes += ch
    mac_changes = linuxconf.drop_mac_bindings(files)
    changes += mac_changes
    legacy = bool(mac_changes) and linuxconf.uses_legacy_names(insp.network)
    cmdline = insp.kernel_cmdline or ""
    if legacy and "net.ifnames=0" in cmdline:
        legacy = False
    if files.exists("/etc/default/grub"):
        text, ch = linuxconf.edit_grub_defaults(
            files.read("/etc/default/grub"), serial=True, use_uuid=True, ifnames0=legacy
        )
        # The device name may also sit in GRUB_CMDLINE_LINUX (root=, resume=).
        text, ch2 = linuxconf.rewrite_cmdline(text, uuids)
        files.write("/etc/default/grub", text)
        changes += ch + ch2
    # BLS entries (RHEL 8+, Fedora) and /etc/kernel/cmdline carry the kernel line themselves.
    for path in [*glob(files, "/boot/loader/entries/*.conf"), "/etc/kernel/cmdline"]:
        if not files.exists(path):
            continue
        text = files.read(path)
        new, ch = linuxconf.rewrite_cmdline(text, uuids)
        if path.endswith(".conf"):
            new = re.sub(
                r"^(options\s+)(.*)$",
                lambda m: m.group(1) + linuxconf.ensure_serial_console(m.group(2)),
                new,
                flags=re.M,
            )
        else:
            new = linuxconf.ensure_serial_console(new.strip()) + "\n"
        if new != text:
            files.write(path, new)
            changes += ch or [f"kernel line: serial console in {path}"]
    return changes


def run_in_guest(g: Any, cmd: GuestCommand) -> str:
    """Run a command inside the guest (chroot in the appliance); errors name the command."""
    log.info("guest: %s (%s)", shlex.join(cmd.argv), cmd.why)
    try:
        out: str = g.sh(cmd.shell() + " 2>&1")
    except RuntimeError as e:
        raise ConversionFailed(
            f"{shlex.join(cmd.argv)} failed inside the guest ({cmd.why}): {e}",
            hint="read the conversion log; the overlay is discarded, the restore point is intact",
        ) from e
    return out


def rebuild_grub(g: Any, files: GuestFiles, insp: Inspection) -> list[str]:
    out = []
    for cmd in grub_commands(files, insp):
        run_in_guest(g, cmd)
        out.append(f"bootloader: {shlex.join(cmd.argv)}")
    return out


# --------------------------------------------------------------------------- fast initramfs

APPEND_SCRIPT = r"""
set -eu
export PATH={path}
v={version}; initrd={initrd}; w=/tmp/ferryman-initrd
rm -rf "$w"; mkdir -p "$w/old" "$w/dep/lib/modules/$v" "$w/stage"
unmkinitramfs "$initrd" "$w/old"
src="$w/old"; [ -d "$w/old/main" ] && src="$w/old/main"
# Where the initramfs keeps its modules: /lib/modules, or /usr/lib/modules behind a lib symlink.
base=lib/modules; [ -L "$src/lib" ] && base=usr/lib/modules
[ -d "$src/$base/$v" ] && cp -a "$src/$base/$v/." "$w/dep/lib/modules/$v/"
for f in {modules}; do
    mkdir -p "$w/dep/lib/modules/$v/$(dirname "$f")" "$w/stage/$base/$v/$(dirname "$f")"
    cp "/lib/modules/$v/$f" "$w/dep/lib/modules/$v/$f"
    cp "/lib/modules/$v/$f" "$w/stage/$base/$v/$f"
done
for f in modules.order modules.builtin modules.builtin.modinfo; do
    [ -e "$w/dep/lib/modules/$v/$f" ] || cp "/lib/modules/$v/$f" "$w/dep/lib/modules/$v/$f"
done
depmod -b "$w/dep" "$v"
cp "$w/dep/lib/modules/$v"/modules.* "$w/stage/$base/$v/"
mkdir -p "$w/stage/conf"
[ -f "$src/conf/modules" ] && cat "$src/conf/modules" > "$w/stage/conf/modules"
printf '%s\n' {load} >> "$w/stage/conf/modules"
( cd "$w/stage" && find . -mindepth 1 | sed 's|^\./||' | grep -v '^lib$' | sort \
    | cpio -o -H newc --quiet -R 0:0 | gzip -1 > "$w/virtio.cpio.gz" )
# The kernel unpacks concatenated archives in order; later files replace earlier ones.
size=$(stat -c %s "$initrd"); pad=$(( 4 + (4 - size % 4) % 4 ))
head -c "$pad" /dev/zero >> "$initrd"
cat "$w/virtio.cpio.gz" >> "$initrd"
stat -c %s "$w/virtio.cpio.gz"
rm -rf "$w"
"""


def module_closure(modules_dep: str, wanted: tuple[str, ...]) -> list[str]:
    """Paths (relative to /lib/modules/VERSION) of ``wanted`` modules and their dependencies."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[path] = rest.split()
        name = path.rsplit("/", 1)[-1].split(".ko", 1)[0].replace("-", "_")
        by_name[name] = path
    out: list[str] = []
    todo = [by_name[w] for w in wanted if w in by_name]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.append(p)
        todo += deps.get(p, [])
    return sorted(out)


def append_virtio_initramfs(
    g: Any, files: GuestFiles, insp: Inspection, kernel: KernelInfo
) -> list[str]:
    """Append a small cpio with the virtio modules to an initramfs-tools initramfs.

    Only for initramfs-tools guests (Debian, Ubuntu): /conf/modules is its load list. Runs the
    guest's own unmkinitramfs, depmod and cpio inside the appliance, on a few files instead
    of the whole image, so it costs seconds where update-initramfs costs minutes under TCG.
    """
    if insp.family != "debian" or kernel.initrd is None:
        raise ConversionFailed(
            f"{insp.hostname}: the append strategy needs an initramfs-tools initramfs",
            hint="use initramfs='guest-tool'",
        )
    dep = files.read(f"/lib/modules/{kernel.version}/modules.dep")
    mods = module_closure(dep, INITRAMFS_VIRTIO)
    builtin = set(kernel.modules) - {
        m.rsplit("/", 1)[-1].split(".ko", 1)[0].replace("-", "_") for m in mods
    }
    if not mods and not builtin:
        raise ConversionFailed(f"{insp.hostname}: no virtio modules in {kernel.version}")
    script = APPEND_SCRIPT.format(
        path=GUEST_PATH,
        version=shlex.quote(kernel.version),
        initrd=shlex.quote(kernel.initrd),
        modules=" ".join(shlex.quote(m) for m in mods),
        load=" ".join(INITRAMFS_VIRTIO),
    )
    try:
        out = str(g.sh(script + " 2>&1")).strip()
    except RuntimeError as e:
        raise ConversionFailed(
            f"appending virtio drivers to {kernel.initrd} failed: {e}",
            hint="convert with initramfs='guest-tool' (runs update-initramfs)",
        ) from e
    size = out.splitlines()[-1] if out else "?"
    return [f"initramfs: appended {len(mods)} virtio modules ({size} bytes) to {kernel.initrd}"]
