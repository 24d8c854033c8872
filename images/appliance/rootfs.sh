#!/bin/bash
# Clean-up of the installed appliance root tree ($1) before it is packed. Runs on the host.
set -euo pipefail
root=$1
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb
rm -f "$root"/var/log/*.log "$root"/var/log/apt/* "$root"/var/cache/debconf/*-old
# Every clone gets its own machine-id and SSH host keys (made at its first boot).
: > "$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_*
