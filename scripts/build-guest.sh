#!/usr/bin/env bash
# Build (or reuse) the small Linux test guest: Debian kernel + initramfs with busybox,
# qemu-guest-agent and e2fsprogs.  Cached in $BACKUPKIT_GUEST_CACHE (default
# /var/tmp/backupkit-guest); rebuilt only when missing or when tests/guest/init.sh or
# tests/guest/bkguest.py changed.  Needs apt-get download, dpkg-deb, ldd.
# Prints kernel=, initrd=, version= lines.  See docs/test-guest.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" tests/guest/bkguest.py "$@"
