#!/bin/bash
# Make the guest tree's ($1) initramfs in a chroot on the host, then clean the mounts. The root
# tree is built without one (INITRD=No): the guest's recipe decides what goes in it.
set -euo pipefail
root=$1
mount -t proc proc "$root/proc"
trap 'umount "$root/proc"' EXIT
rm -f "$root"/boot/initrd.img-*
chroot "$root" update-initramfs -c -k all
