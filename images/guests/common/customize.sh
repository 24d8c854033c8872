#!/bin/bash
# Shared host-side customisation of a Debian guest tree ($1); the guest's own customize.sh
# runs after it. Runs update-initramfs in a chroot on the host (native speed, not TCG).
set -euo pipefail
root=$1
here=$(cd "$(dirname "$0")" && pwd)
cp -a "$here/overlay/." "$root/"
echo 'root:ferryman' | chroot "$root" chpasswd
# A VMware-built initramfs: only the drivers of the VMware virtual hardware, no virtio.
sed -i 's/^MODULES=.*/MODULES=list/' "$root/etc/initramfs-tools/initramfs.conf"
cat > "$root/etc/initramfs-tools/modules" <<MODS
# VMware virtual hardware (SATA/AHCI, PIIX IDE, LSI/PVSCSI), no virtio
ahci
ata_piix
sd_mod
vmw_pvscsi
mptspi
ext4
MODS
cat > "$root/etc/network/interfaces" <<NET
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback
NET
