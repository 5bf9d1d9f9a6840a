#!/usr/bin/env bash
# Install everything backupkit needs on a fresh Debian 12 machine, idempotently:
# Debian packages, a venv in .venv with backupkit and its dev tools, and a
# running libvirtd.  Run as root (apt, libvirtd).  Safe to run again.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

APT_PACKAGES=(
  python3-venv python3-dev gcc          # the venv; libvirt-python and ovirt-imageio build from source
  qemu-utils qemu-system-x86            # qemu-img, qemu-nbd, KVM/TCG domains
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  libvirt-dev pkg-config                # to build libvirt-python
  libnbd-bin nbdkit                     # nbdcopy (bench), nbdkit fault injection
  e2fsprogs util-linux                  # mkfs, losetup (fault tests)
  groff-base man-db                     # man page checks
  systemd                               # systemd-analyze verify
  time                                  # /usr/bin/time: peak RSS in bench/run.py
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv" >&2
  "$PY" -m venv .venv
fi
stamp=.venv/.backupkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing backupkit into .venv" >&2
  log=.venv/setup.log
  if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e ".[dev]"; } >"$log" 2>&1; then
    tail -30 "$log" >&2
    echo "setup: pip install failed (full log: $log)" >&2
    exit 1
  fi
  touch "$stamp"
fi
# An editable install leaves backupkit without bytecode, and with PYTHONDONTWRITEBYTECODE
# set every command would compile its modules again (70-90 ms a start). A wheel or a
# distribution package compiles at install time; so does this (stale files are ignored).
.venv/bin/python -m compileall -q backupkit >/dev/null

bash scripts/start-libvirtd.sh
