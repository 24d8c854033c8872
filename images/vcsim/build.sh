#!/bin/bash
# Build the vcsim launcher offline from Debian's govmomi simulator library and print the path
# of the binary. The binary is cached outside the clone, keyed by a hash of the sources, so a
# second run (or a fresh clone of the same sources) does not rebuild.
#
#   images/vcsim/build.sh            -> /var/cache/ferryman/vcsim/<hash>/ferryman-vcsim
#
# Needs golang-go and golang-github-vmware-govmomi-dev (scripts/debian-packages.txt).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${FERRYMAN_CACHE:-/var/cache/ferryman}/vcsim
govmomi_version=$(dpkg-query -W -f='${Version}' golang-github-vmware-govmomi-dev 2>/dev/null || echo unknown)
key=$( (cat "$here"/*.go; echo "$govmomi_version"; go version) | sha256sum | cut -c1-16)
out="$cache/$key/ferryman-vcsim"
if [ ! -x "$out" ]; then
    mkdir -p "$cache/$key"
    tmp=$(mktemp -d "$cache/build.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    cp "$here"/*.go "$tmp/"
    (cd "$tmp" && GOPATH=/usr/share/gocode GO111MODULE=off \
        GOCACHE="${GOCACHE:-$cache/go-build}" go build -o "$tmp/ferryman-vcsim" . >&2)
    mv "$tmp/ferryman-vcsim" "$out"
fi
echo "$out"
