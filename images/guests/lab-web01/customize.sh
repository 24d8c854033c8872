#!/bin/bash
# "lab-web01": the demo's lab VM. The vmware-like guest (its customize.sh ran before this one:
# see BASE_RECIPE in builder.py) named web01, plus a unit that writes 1 MiB every 2 seconds
# into a 64 MiB ring of files, so every sync of the lab has changes to carry.
set -euo pipefail
root=$1
here=$(cd "$(dirname "$0")" && pwd)
cp -a "$here/overlay/." "$root/"
echo web01 > "$root/etc/hostname"
printf '127.0.0.1\tlocalhost\n127.0.1.1\tweb01\n' > "$root/etc/hosts"
