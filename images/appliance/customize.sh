#!/bin/bash
# Turn the installed Debian tree ($1) into the Ferryman appliance. Runs on the host, before
# the Ferryman release is installed into it. Idempotent enough for a fresh tree only.
set -euo pipefail
root=$1
here=$(cd "$(dirname "$0")" && pwd)
inroot() { chroot "$root" "$@"; }

cp -a "$here/overlay/." "$root/"
chown -R 0:0 "$root/etc" "$root/usr/local"
chmod 440 "$root/etc/sudoers.d/ferryman-admin"
mkdir -p "$root/opt/ferryman/releases" "$root/var/lib/ferryman/volumes" "$root/var/log/ferryman" "$root/etc/ferryman"
chmod 700 "$root/var/lib/ferryman"
echo ferryman > "$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 ferryman\n::1 localhost ip6-localhost ip6-loopback\n' > "$root/etc/hosts"

# fstab: the root file system by its fixed UUID (the volume store line comes at first boot).
printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$FERRYMAN_ROOT_UUID" > "$root/etc/fstab"

# Roles of the API socket (appliance/daemon/auth.py) and the two accounts.
for g in ferryman ferryman-operator ferryman-admin; do
    inroot getent group "$g" >/dev/null || inroot groupadd --system "$g"
done
inroot useradd --create-home --uid 1001 --shell /usr/local/bin/ferryman-console \
    --groups ferryman,ferryman-operator --comment "Ferryman operator (TUI only)" op
inroot useradd --create-home --uid 1002 --shell /bin/bash \
    --groups sudo,ferryman,ferryman-admin,libvirt,adm,systemd-journal --comment "Ferryman maintenance" admin
# The operator sees the TUI, not Debian's legal notice and last-login line.
touch "$root/home/op/.hushlogin"
# No password until first boot sets one ('*': no password login, but not "locked" for sshd keys).
inroot usermod -p '*' op
inroot usermod -p '*' admin
inroot passwd -l root >/dev/null
# Textual needs a UTF-8 locale; C.UTF-8 is built into libc.
echo 'LANG=C.UTF-8' > "$root/etc/default/locale"

# Services.
rm -f "$root/etc/systemd/network/"*dhcp*.network.dpkg* 2>/dev/null || true
inroot systemctl enable systemd-networkd.service systemd-resolved.service systemd-timesyncd.service \
    ssh.service libvirtd.service virtlogd.socket ferrymand.service ferryman-firstboot.service \
    ferryman-volumes.service serial-getty@ttyS0.service getty@tty1.service >/dev/null 2>&1
inroot systemctl disable networking.service >/dev/null 2>&1 || true
inroot systemctl mask systemd-networkd-wait-online.service >/dev/null 2>&1 || true
ln -sf /run/systemd/resolve/stub-resolv.conf "$root/etc/resolv.conf"
# The default libvirt network would clash with customer subnets; test runs make their own.
rm -f "$root/etc/libvirt/qemu/networks/autostart/default.xml"

# Kernel readable by libguestfs (supermin) and the KVM probe.
chmod 0644 "$root"/boot/vmlinuz-*

# The build chroot must not start services; the appliance must.
rm -f "$root/usr/sbin/policy-rc.d"
: > "$root/etc/machine-id"
