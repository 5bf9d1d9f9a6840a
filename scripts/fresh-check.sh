#!/usr/bin/env bash
# fresh-check: do the README's two commands work on a fresh Debian 12 machine?
#
#   bash scripts/fresh-check.sh [--keep] [--no-cache] [--timeout SECONDS]
#
# Bootstraps a minimal Debian 12 root (debootstrap --variant=minbase bookworm from
# the Debian mirror in this host's apt sources, plus only python3, ca-certificates,
# git and procps), gives it this network's apt sources, CA certificates and pip
# configuration (read-only bind mounts of the local package folders it names), as
# any fresh machine here has them, clones this checkout into /root/backupkit, and
# runs, exactly as the README writes them:
#
#   bash scripts/demo.sh
#   bash scripts/test.sh
#
# inside, in its own PID and mount namespace (pivot_root, not chroot), so its
# libvirtd and QEMU are its own.  CI is passed through (CI=true: tests needing a
# real component fail instead of skipping).  Their output streams through; the exit
# status is theirs (the first that fails), 124 on timeout.
#
# It tests the COMMITTED state: `git clone` of this checkout takes its current
# commit (HEAD); uncommitted changes are NOT included.
#
# Options:
#   --keep             keep the root afterwards (its path is printed); default: remove it
#   --no-cache         debootstrap anew instead of using the cached pristine root
#   --timeout SECONDS  bound of the whole run (default 2700): the README's commands
#                      are stopped when it is reached
#   -h, --help         this text
#
# Needs root, ~2 GB in /var/tmp, internet access to the Debian and Python package
# indexes.  Installs debootstrap and zstd on the host if missing.  The pristine root
# (debootstrap + the four packages, nothing else) is cached per week in
# /var/cache/backupkit/debian-root/ (see scripts/debian-root.sh).  The root lives
# in /var/tmp/backupkit-fresh.XXXXXX and is removed on exit, on failure and when
# interrupted; one left by a killed run is removed by the next run.  Safe to run
# again, and next to other work: the root gets its own /dev/kvm node, so the host's
# node is never changed.
# shellcheck disable=SC2317  # the trap handlers are reachable
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
DROOT_TAG=fresh-check
# shellcheck source=scripts/debian-root.sh
. "$here/scripts/debian-root.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;/^# shellcheck/d;s/^# \{0,1\}//;p}' "$0"; }
droot_options 2700 "$@"
[ "$(id -u)" = 0 ] || { echo "fresh-check: run as root (debootstrap, namespaces)" >&2; exit 2; }

# Where the project is cloned inside: where `git clone` as root puts it.
SRC=/root/backupkit
start=$SECONDS
commit=$(droot_commit "$here")
droot_host_packages debootstrap zstd

WORK=
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e   # every step of the cleanup runs, whatever fails
  droot_stop_job
  if [ -n "$WORK" ]; then
    if [ "$keep" = 1 ]; then
      droot_say "kept the root: $WORK/root (remove with: rm -rf --one-file-system $WORK)"
    else
      droot_remove "$WORK" || rc=1
    fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'droot_say "FAILED: interrupted"; exit 130' INT
trap 'droot_say "FAILED: terminated"; exit 143' TERM

WORK=$(droot_workdir fresh)
ROOT=$WORK/root
t=$SECONDS
droot_create "$ROOT" "$use_cache"
droot_took "$t" "the fresh root (with this network's settings)"

droot_clone "$here" "$commit" "$ROOT" "$SRC"

# The kernel's node as it is before udev runs (root:root 0600): the README's commands
# give it the kvm group themselves (scripts/start-libvirtd.sh), as udev would.
DROOT_KVM=
if droot_kvm_node "$WORK/kvm" 0600 0; then DROOT_KVM=$WORK/kvm; fi

# The root shares the host's network: if this host runs the test S3 gateway itself
# (scripts/start-s3.sh), the root's gateway takes other ports.
if (exec 3<>/dev/tcp/127.0.0.1/17480) 2>/dev/null; then
  export BACKUPKIT_TEST_S3_PORT_SHIFT=${BACKUPKIT_TEST_S3_PORT_SHIFT:-1000}
  droot_say "this host's S3 gateway is up: the root's uses ports shifted by $BACKUPKIT_TEST_S3_PORT_SHIFT"
fi

# Runs inside the root: the README's commands, exactly as written, in order.
# shellcheck disable=SC2016
inner='cd "$1"
for cmd in "bash scripts/demo.sh" "bash scripts/test.sh"; do
  printf "\n== fresh-check: %s\n" "$cmd" >&2
  t=$SECONDS
  rc=0; bash -c "$cmd" </dev/null || rc=$?
  printf "== fresh-check: %s exited %s after %s s\n" "$cmd" "$rc" "$((SECONDS - t))" >&2
  if [ "$rc" != 0 ]; then
    printf "fresh-check: FAILED: %s exited %s in a fresh Debian 12 root\n" "$cmd" "$rc" >&2
    exit "$rc"
  fi
done'

t=$SECONDS
left=$((limit - (SECONDS - start)))
[ "$left" -gt 0 ] || { droot_say "FAILED: timed out after $limit s (--timeout), before the README's commands"; exit 124; }
rc=0; DROOT_TIMEOUT=$left droot_run "$ROOT" bash -c "$inner" fresh-check "$SRC" || rc=$?
droot_took "$t" "the README's commands"
if [ "$rc" = 124 ]; then
  droot_say "FAILED: timed out after $limit s (--timeout)"
elif [ "$rc" = 0 ]; then
  droot_say "passed: demo and tests in a fresh Debian 12 root at ${commit:0:12} ($((SECONDS - start)) s)"
fi
exit "$rc"
