#!/bin/bash
# Post-debootstrap clean-up of the shared Debian 12 root tree ($1). Runs on the host.
set -euo pipefail
root=$1
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log
# Every boot of a clone gets its own machine-id.
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
