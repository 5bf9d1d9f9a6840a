#!/usr/bin/env bash
# Start virtlogd and libvirtd if they are not running (no systemd here).
# Idempotent: checks before starting, never kills anything.
set -euo pipefail
URI=qemu:///system

if virsh -c "$URI" version >/dev/null 2>&1; then
  exit 0
fi

for g in kvm libvirt-qemu libvirt; do
  getent group "$g" >/dev/null || groupadd --system "$g"
done
getent passwd libvirt-qemu >/dev/null ||
  useradd --system --no-create-home --gid libvirt-qemu --shell /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu /var/lib/libvirt/images

conf=/etc/libvirt/qemu.conf
mkdir -p /etc/libvirt && touch "$conf"
set_conf() {  # set_conf KEY VALUE: replace or append KEY = VALUE
  if grep -qE "^\s*$1\s*=" "$conf"; then
    sed -i -E "s|^\s*$1\s*=.*|$1 = $2|" "$conf"
  else
    echo "$1 = $2" >>"$conf"
  fi
}
set_conf user '"root"'
set_conf group '"root"'
set_conf security_driver '"none"'

pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d

for _ in $(seq 1 100); do
  if virsh -c "$URI" version >/dev/null 2>&1; then
    echo "start-libvirtd: libvirtd is running" >&2
    exit 0
  fi
  sleep 0.1
done
echo "start-libvirtd: libvirtd did not answer on $URI within 10s" >&2
exit 1
