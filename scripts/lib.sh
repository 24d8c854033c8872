# Shared set-up steps for scripts/demo, scripts/test and scripts/bench. Sourced, not run.
# Idempotent: a second run on a ready machine takes a few seconds.

FERRYMAN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$FERRYMAN_ROOT/.venv"
# Built images (test guests, lab, appliance) live outside the clone so a fresh clone reuses them.
export FERRYMAN_CACHE=${FERRYMAN_CACHE:-/var/cache/ferryman}
# No usable nested KVM on the build machines: libguestfs must use TCG. ferrymand sets the same
# from its KVM probe; these defaults make the scripts and tests independent of the probe.
export LIBGUESTFS_BACKEND=${LIBGUESTFS_BACKEND:-direct}
export LIBGUESTFS_BACKEND_SETTINGS=${LIBGUESTFS_BACKEND_SETTINGS:-force_tcg}

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "run as root (it installs Debian packages and starts libvirtd): sudo $0 $*"
}

APT_UPDATED=

package_list() {
    grep -vE '^\s*(#|$)' "$FERRYMAN_ROOT/scripts/$1"
}

ensure_packages() {
    # The packages named, only the missing ones; one apt-get update per run at most.
    local want="$*" missing=() p
    for p in $want; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        say "installing ${#missing[@]} Debian packages: ${missing[*]}"
        if [ -z "$APT_UPDATED" ]; then
            DEBIAN_FRONTEND=noninteractive apt-get update -qq
            APT_UPDATED=1
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

ensure_venv() {
    # The bindings (nbd, guestfs, libvirt, hivex) exist only as Debian packages, for /usr/bin/python3.
    local stamp="$VENV/.ferryman-stamp" want
    want=$(sha256sum "$FERRYMAN_ROOT/pyproject.toml" | cut -d' ' -f1)
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV from /usr/bin/python3 (--system-site-packages)"
        /usr/bin/python3 -m venv --system-site-packages "$VENV"
    fi
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        say "installing Ferryman and its pinned Python dependencies"
        "$VENV/bin/pip" install -q --disable-pip-version-check -e "$FERRYMAN_ROOT[dev]" \
            || die "pip could not install the pinned dependencies (see above); is PyPI reachable?"
        echo "$want" > "$stamp"
    fi
    "$VENV/bin/python" -c 'import nbd, guestfs, libvirt' \
        || die "the venv cannot import the Debian bindings; remove $VENV and run again"
}

have_systemd() { [ -d /run/systemd/system ] && [ "$(ps -o comm= 1)" = systemd ]; }

ensure_kvm_group() {
    # udev gives /dev/kvm to group kvm (Debian's rule); in containers the node can arrive with a
    # host gid that maps to another group (here: ssl-cert). libvirtd then finds the qemu
    # capabilities it probed "outdated" on every call ("KVM was enabled when probing ..., but it
    # is not available now") and re-probes qemu each time: 4 s per virsh call when idle, minutes
    # per domain start under load. Giving the node back to kvm, as udev would, ends that.
    [ -c /dev/kvm ] && getent group kvm >/dev/null || return 0
    if [ "$(stat -c %G /dev/kvm)" != kvm ]; then
        say "giving /dev/kvm to group kvm as udev would (it is $(stat -c %G /dev/kvm) here)"
        chgrp kvm /dev/kvm || say "warning: could not chgrp /dev/kvm; libvirt calls will be slow"
    fi
}

ensure_services() {
    # libvirtd needs virtlogd. On the appliance systemd runs both; on build machines systemd
    # is not PID 1, so start the daemons directly (they outlive this script, as they should).
    if have_systemd; then
        systemctl start virtlogd.socket libvirtd.service >/dev/null 2>&1 || true
    else
        pgrep -x virtlogd >/dev/null || { say "starting virtlogd"; virtlogd -d; }
        pgrep -x libvirtd >/dev/null || { say "starting libvirtd"; libvirtd -d; }
    fi
    local i
    for i in $(seq 50); do
        virsh -q -c qemu:///system version >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "libvirtd does not answer on qemu:///system; see /var/log/libvirt/libvirtd.log"
}

ensure_groups() {
    # Who may use the API socket (root:ferryman 0660) and with which role (docs/security.md).
    local g
    for g in ferryman ferryman-operator ferryman-admin; do
        getent group "$g" >/dev/null || groupadd --system "$g"
    done
}

setup_all() {
    # FERRYMAN_PACKAGES=runtime: what Ferryman and the demo need; the tests and the benchmark
    # also need scripts/debian-packages-test.txt (the default).
    need_root "$@"
    if [ "${FERRYMAN_PACKAGES:-all}" = runtime ]; then
        ensure_packages $(package_list debian-packages.txt)
    else
        ensure_packages $(package_list debian-packages.txt) $(package_list debian-packages-test.txt)
    fi
    ensure_venv
    ensure_groups
    ensure_kvm_group
    ensure_services
    export PATH="$VENV/bin:$PATH"
}
