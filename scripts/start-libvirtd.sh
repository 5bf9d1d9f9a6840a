#!/usr/bin/env bash
# Start virtlogd and libvirtd if they are not running (no systemd here), configured
# as a stock Debian host runs them: QEMU as the unprivileged `libvirt-qemu` user
# (DAC labels), never `user = "root"`.  Only what udev would do on a real host (the
# /dev/kvm group and mode) is done by hand.
# Idempotent: checks before starting, never kills anything by name.
set -euo pipefail
URI=qemu:///system

for g in kvm libvirt-qemu libvirt; do
  getent group "$g" >/dev/null || groupadd --system "$g"
done
getent passwd libvirt-qemu >/dev/null ||
  useradd --system --no-create-home --home-dir /var/lib/libvirt --gid libvirt-qemu \
    --shell /usr/sbin/nologin libvirt-qemu
id -nG libvirt-qemu | tr ' ' '\n' | grep -qx kvm || usermod -aG kvm libvirt-qemu
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu /var/lib/libvirt/images
# What udev's 50-udev-default / 65-kvm rules do on a host with systemd.
if [ -e /dev/kvm ]; then
  chgrp kvm /dev/kvm
  chmod 0660 /dev/kvm
fi

# Stock qemu.conf: user, group and security_driver unset.  An earlier version of this
# script forced QEMU to run as root; undo that so no test runs where no host does.
conf=/etc/libvirt/qemu.conf
changed=0
if [ -f "$conf" ] && grep -qE '^\s*(user|group|security_driver)\s*=' "$conf"; then
  sed -i -E 's/^\s*(user|group|security_driver)\s*=/#&/' "$conf"
  changed=1
fi

if virsh -c "$URI" version >/dev/null 2>&1; then
  if [ "$changed" = 0 ]; then
    exit 0
  fi
  # Running with the old (root) settings: restart it through its own pid file.
  pidfile=/var/run/libvirtd.pid
  if [ -s "$pidfile" ]; then
    pid=$(cat "$pidfile")
    echo "start-libvirtd: restarting libvirtd ($pid) so QEMU runs as libvirt-qemu" >&2
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
fi

[ -s /var/run/virtlogd.pid ] && kill -0 "$(cat /var/run/virtlogd.pid)" 2>/dev/null || virtlogd -d
if ! virsh -c "$URI" version >/dev/null 2>&1; then
  [ -s /var/run/libvirtd.pid ] && kill -0 "$(cat /var/run/libvirtd.pid)" 2>/dev/null || libvirtd -d
fi

for _ in $(seq 1 100); do
  if virsh -c "$URI" version >/dev/null 2>&1; then
    echo "start-libvirtd: libvirtd is running (QEMU as libvirt-qemu)" >&2
    exit 0
  fi
  sleep 0.1
done
echo "start-libvirtd: libvirtd did not answer on $URI within 10s" >&2
exit 1
