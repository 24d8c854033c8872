#!/bin/bash
# "agent-server": a Debian 12 server that the linux-agent source replicates over SSH.
# Root on LVM (vg0/root, builder's LVM layout), sshd, python3 (the agent helper's runtime),
# nbdkit and qemu-utils (the helper's NBD servers), lvm2 + util-linux (lvcreate, fsfreeze).
# No key is baked in: a test hands its throw-away public key to the guest through qemu's
# fw_cfg (opt/ferryman/authorized_keys), which ferryman-fwcfg-keys copies at boot. The
# extra packages come from the mirror apt uses; their .debs are kept next to the images so
# a rebuild installs them without the network.
set -euo pipefail
root=$1
here=$(cd "$(dirname "$0")" && pwd)
cache=${FERRYMAN_CACHE:-/var/cache/ferryman}/images/debs-agent-server
mirror=${FERRYMAN_APT_MIRROR:-$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)}
mirror=${mirror:-http://deb.debian.org/debian}
packages="openssh-server python3 nbdkit qemu-utils"

cp -a "$here/overlay/." "$root/"
echo agent-server > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tagent-server\n' > "$root/etc/hosts"
cat > "$root/etc/fstab" <<FSTAB
# <file system> <mount point> <type> <options> <dump> <pass>
UUID=5e1f2a3b-0c4d-4e5f-8a9b-000000000004 / ext4 errors=remount-ro 0 1
LABEL=boot /boot ext4 defaults 0 2
FSTAB
# Booted by the tests on virtio; LVM root needs dm_mod in the initramfs.
cat >> "$root/etc/initramfs-tools/modules" <<MODS
virtio_pci
virtio_blk
virtio_net
dm_mod
dm_snapshot
MODS
# qemu user-mode network: the guest is always 10.0.2.15, the gateway 10.0.2.2.
cat >> "$root/etc/network/interfaces" <<NET

auto eth0
iface eth0 inet static
    address 10.0.2.15/24
    gateway 10.0.2.2
NET
cat > "$root/etc/default/grub" <<GRUB
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8 net.ifnames=0"
GRUB_DISABLE_RECOVERY=true
GRUB_DISABLE_OS_PROBER=true
GRUB

# Extra packages, in a chroot on the host; services must not start here.
mkdir -p "$cache"
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
echo "deb $mirror bookworm main" > "$root/etc/apt/sources.list"
mkdir -p "$root/var/cache/apt/archives"
mount -t proc proc "$root/proc"
mount --bind "$cache" "$root/var/cache/apt/archives"
trap 'umount "$root/var/cache/apt/archives"; umount "$root/proc"' EXIT
if ls "$cache"/*.deb >/dev/null 2>&1 && chroot "$root" sh -c 'dpkg -i /var/cache/apt/archives/*.deb' ; then
    :
else
    chroot "$root" apt-get update
    chroot "$root" apt-get install -y --no-install-recommends $packages
fi
chroot "$root" sh -c "dpkg -s $packages >/dev/null"
rm -f "$root/usr/sbin/policy-rc.d"
rm -rf "$root"/var/lib/apt/lists/*
: > "$root/etc/apt/sources.list"
# sshd: keys only, root may log in with a key (the agent needs root or sudo for LVM).
cat > "$root/etc/ssh/sshd_config.d/ferryman.conf" <<SSHD
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UseDNS no
SSHD
mkdir -p "$root/root/.ssh"
chmod 700 "$root/root/.ssh"
ln -sf /etc/systemd/system/ferryman-fwcfg-keys.service \
    "$root/etc/systemd/system/multi-user.target.wants/ferryman-fwcfg-keys.service"
