#!/bin/bash
# "vmware-like": a Debian 12 guest as VMware would run it: root on /dev/sda1 by device name in
# fstab and on the kernel line, open-vm-tools installed, initramfs without virtio drivers.
set -euo pipefail
root=$1
echo vmware-like > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tvmware-like\n' > "$root/etc/hosts"
cat > "$root/etc/fstab" <<FSTAB
# <file system> <mount point> <type> <options> <dump> <pass>
/dev/sda1 / ext4 errors=remount-ro 0 1
FSTAB
cat > "$root/etc/default/grub" <<GRUB
GRUB_DEFAULT=0
GRUB_TIMEOUT=0
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="console=tty0 console=ttyS0,115200n8"
# Root by device name (/dev/sda1), as many VMware templates have it.
GRUB_DISABLE_LINUX_UUID=true
GRUB_DISABLE_RECOVERY=true
GRUB_DISABLE_OS_PROBER=true
GRUB
