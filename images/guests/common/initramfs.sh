#!/bin/bash
# Rebuild the guest tree's ($1) initramfs in a chroot on the host, then clean the mounts.
set -euo pipefail
root=$1
mount -t proc proc "$root/proc"
trap 'umount "$root/proc"' EXIT
chroot "$root" update-initramfs -u -k all
