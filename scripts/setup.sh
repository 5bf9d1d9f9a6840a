#!/usr/bin/env bash
# Install everything backupkit needs on a fresh Debian 12 machine, idempotently:
# Debian packages, a venv in .venv with backupkit and its dev tools, and a
# running libvirtd.  Run as root (apt, libvirtd).  Safe to run again.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

APT_PACKAGES=(
  python3 python3-venv                  # the venv (Debian's python3 lacks ensurepip without it)
  gcc python3-dev                       # libvirt-python and ovirt-imageio build from source
  qemu-utils qemu-system-x86            # qemu-img, qemu-nbd, KVM/TCG domains
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  libvirt-dev pkg-config                # to build libvirt-python
  libnbd-bin nbdkit                     # nbdcopy (bench), nbdkit fault injection
  nbdkit-plugin-python                  # backupkit serve: the repository as an NBD export
  fuse3 fdisk dosfstools                # backupkit mount (nbdfuse is in libnbd-bin), vfat tests
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
  export DEBIAN_FRONTEND=noninteractive
  # A run interrupted inside dpkg leaves packages half-configured; finish them first.
  dpkg --configure -a >/dev/null 2>&1 || true
  # Wait for the dpkg lock (unattended-upgrades, another setup) instead of failing.
  apt-get -o DPkg::Lock::Timeout=600 update -qq || { echo "setup: apt-get update failed" >&2; exit 1; }
  if ! apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}" >/tmp/backupkit-apt.log 2>&1; then
    tail -20 /tmp/backupkit-apt.log >&2
    echo "setup: apt-get install failed (full log: /tmp/backupkit-apt.log)" >&2
    exit 1
  fi
fi

# Debian's interpreter, not whatever python3 comes first in PATH: the venv must be the
# same on every machine, and Debian's python3-* modules (nbdkit's python plugin) use it.
PY=${PYTHON:-/usr/bin/python3}
# A venv is usable when its python runs, pip imports and it was made from $PY; anything
# else (a run killed half-way, ensurepip missing, another interpreter) is made anew.
venv_ok() {
  [ -x .venv/bin/python ] && [ -x .venv/bin/pip ] &&
    [ "$(cat .venv/.backupkit-python 2>/dev/null)" = "$(readlink -f "$PY")" ] &&
    .venv/bin/python -c 'import pip' >/dev/null 2>&1
}
if ! venv_ok; then
  if [ -e .venv ]; then
    echo "setup: .venv is incomplete or from another interpreter; making it anew" >&2
    rm -rf .venv
  fi
  echo "setup: creating .venv" >&2
  if ! "$PY" -m venv .venv; then
    rm -rf .venv
    echo "setup: '$PY -m venv' failed (is python3-venv installed?)" >&2
    exit 1
  fi
  readlink -f "$PY" >.venv/.backupkit-python
fi
stamp=.venv/.backupkit-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing backupkit into .venv" >&2
  log=.venv/setup.log
  rm -f "$stamp"
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
