# shellcheck shell=bash
# A fresh Debian 12 root for the install checks (scripts/fresh-check.sh,
# scripts/systemd-check.sh).  Sourced, not run; the caller sets `set -euo pipefail`
# and DROOT_TAG (its name, for messages).
#
#   droot_options TIMEOUT ARGS...  parse the options both checks take (--keep,
#                                  --no-cache, --timeout S, --help: the caller's usage)
#                                  into keep, use_cache and limit (default TIMEOUT)
#   droot_host_packages PKG...     install missing host packages (debootstrap, ...)
#   droot_workdir KIND             new work directory /var/tmp/backupkit-KIND.XXXXXX
#                                  (removes stale ones of dead runs first)
#   droot_create ROOT [--no-cache] a fresh Debian 12 root at ROOT, set up as a fresh
#                                  machine on this network would be (below)
#   droot_commit CHECKOUT          its HEAD (and a note if it has uncommitted changes)
#   droot_clone CHECKOUT COMMIT ROOT DIR   git clone it into ROOT/DIR, check the commit
#   droot_kvm_node PATH MODE GROUP a private /dev/kvm node (mknod) for the root
#   droot_run ROOT CMD...          run CMD inside ROOT in its own PID and mount
#                                  namespace (pivot_root, not chroot)
#   droot_argv ROOT CMD...         the same command as an array
#   droot_wait CMD...              run CMD so that a trap runs at once (droot_stop_job)
#   droot_remove DIR               remove a work directory (refuses while mounted)
#
# What "fresh" means: `debootstrap --variant=minbase bookworm` from the Debian mirror
# of this host's apt sources, then `apt-get install python3 ca-certificates git procps`
# (what a default server install has that matters here) with the host's apt sources.
# Nothing else is installed.  Then, as a fresh machine on this network would have
# them: the host's apt sources, /etc/resolv.conf, the CA certificates in
# /usr/local/share/ca-certificates (update-ca-certificates), and the pip
# configuration files `pip config list -v` names (the local folders they point at
# are bind-mounted read-only by droot_run).
#
# The cache: debootstrap and the four packages take ~60 s, so the root as it is
# right after them (before anything of this network or the project is added:
# exactly what a fresh machine has) is kept as a tarball in
# /var/cache/backupkit/debian-root/, one per ISO week and per mirror, sources and
# package list (older tarballs are removed).  --no-cache builds it anew.

DROOT_SUITE=bookworm
DROOT_BASE_PACKAGES=(python3 ca-certificates git procps)
DROOT_CACHE_DIR=${DROOT_CACHE_DIR:-/var/cache/backupkit/debian-root}
DROOT_WORK_PARENT=${DROOT_WORK_PARENT:-/var/tmp}
DROOT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# Read-only bind mounts droot_run makes (host path = path inside); filled by droot_create.
DROOT_BINDS=()

# Messages go to the script's own stderr even from a trap that runs while a command's
# stderr is redirected to a log file.
exec {DROOT_STDERR}>&2
# shellcheck disable=SC2034  # keep, use_cache, limit: set for the caller
droot_options() {
  local tag=${DROOT_TAG:-debian-root}
  keep=0 use_cache=1 limit=$1
  shift
  while [ $# -gt 0 ]; do
    case $1 in
      --keep) keep=1 ;;
      --no-cache) use_cache=0 ;;
      --timeout) [ $# -ge 2 ] || { echo "$tag: --timeout needs a number of seconds" >&2; exit 2; }
                 limit=$2; shift ;;
      --timeout=*) limit=${1#*=} ;;
      -h|--help) usage; exit 0 ;;
      *) echo "$tag: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
  done
  case $limit in ''|*[!0-9]*) echo "$tag: --timeout needs a number of seconds" >&2; exit 2 ;; esac
}

droot_say() { printf '%s: %s\n' "${DROOT_TAG:-debian-root}" "$*" >&"$DROOT_STDERR"; }
droot_die() { printf '%s: FAILED: %s\n' "${DROOT_TAG:-debian-root}" "$*" >&"$DROOT_STDERR"; exit 1; }

# Seconds since $1 (a value of $SECONDS), with the label $2: for the timing lines.
droot_took() { droot_say "$2 took $((SECONDS - $1)) s"; }

droot_host_packages() {
  local p missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  droot_say "installing host packages: ${missing[*]}"
  apt-get update -qq || droot_die "apt-get update failed on the host"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null || droot_die "apt-get install ${missing[*]} failed on the host"
}

# The host's apt source files (deb822 .sources and one-line .list), enabled ones only.
droot_apt_sources() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [ -s "$f" ] && printf '%s\n' "$f"
  done
  return 0
}

# The Debian mirror apt uses here: the first URI of a source carrying the suite.
droot_mirror() {
  local f uri
  while read -r f; do
    case $f in
      *.sources)
        uri=$(awk -v suite="$DROOT_SUITE" '
          /^[[:space:]]*$/ { if (u != "" && s) { print u; exit } u = ""; s = 0; next }
          tolower($1) == "uris:" { u = $2 }
          tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == suite) s = 1 }
          END { if (u != "" && s) print u }' "$f" | head -1) ;;
      *)
        uri=$(awk -v suite="$DROOT_SUITE" '$1 == "deb" {
          for (i = 2; i <= NF; i++) if ($i !~ /^\[/) { if ($(i+1) == suite) { print $i; exit } break } }' "$f") ;;
    esac
    if [ -n "$uri" ]; then printf '%s\n' "$uri"; return 0; fi
  done < <(droot_apt_sources)
  droot_die "no apt source for '$DROOT_SUITE' in this host's apt sources"
}

# Remove /var/tmp/backupkit-*.* work directories of runs that died without cleaning up
# (SIGKILL, power loss): their owner PID is gone.  Mounted ones are left alone.
droot_reap_stale() {
  local d pid
  for d in "$DROOT_WORK_PARENT"/backupkit-"$1".*; do
    [ -d "$d" ] || continue
    pid=$(cat "$d/owner.pid" 2>/dev/null || echo)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    droot_say "removing $d (left by an earlier run that did not finish)"
    droot_remove "$d" || true
  done
}

droot_workdir() {
  local d
  droot_reap_stale "$1"
  d=$(mktemp -d "$DROOT_WORK_PARENT/backupkit-$1.XXXXXX")
  echo $$ >"$d/owner.pid"
  printf '%s\n' "$d"
}

# True if anything is mounted at or below $1 (in this mount namespace).
droot_mounted() {
  local dir
  dir=$(realpath -m "$1")
  awk -v d="$dir" '{ p = $5; gsub(/\\040/, " ", p); if (p == d || index(p, d "/") == 1) f = 1 }
                   END { exit !f }' /proc/self/mountinfo
}

droot_remove() {
  local d=$1
  [ -n "$d" ] && [ -d "$d" ] || return 0
  if droot_mounted "$d"; then
    droot_say "not removing $d: something is still mounted below it"
    return 1
  fi
  rm -rf --one-file-system -- "$d"
}

# Build the pristine root (debootstrap + base packages) at $1, or unpack it from the cache.
droot_pristine() {
  local root=$1 use_cache=$2 mirror key tarball t lock f
  mirror=$(droot_mirror)
  key=$( { echo "$DROOT_SUITE minbase $mirror ${DROOT_BASE_PACKAGES[*]}"; droot_apt_sources | xargs cat; } \
         | sha256sum | cut -c1-12)
  tarball="$DROOT_CACHE_DIR/$DROOT_SUITE-minbase-$(date -u +%G-W%V)-$key.tar.zst"
  mkdir -p "$DROOT_CACHE_DIR"
  # One builder at a time; a second run waits and then uses the tarball.
  exec {lock}>"$DROOT_CACHE_DIR/.lock"
  flock "$lock"
  if [ "$use_cache" = 1 ] && [ -s "$tarball" ]; then
    t=$SECONDS
    zstd -q -dc "$tarball" | tar -C "$root" --numeric-owner --xattrs --acls -xf - ||
      droot_die "unpacking $tarball failed"
    droot_took "$t" "unpacking the cached pristine root ($(basename "$tarball"))"
    exec {lock}>&-
    return 0
  fi
  t=$SECONDS
  droot_say "debootstrap --variant=minbase $DROOT_SUITE from $mirror"
  debootstrap --variant=minbase "$DROOT_SUITE" "$root" "$mirror" >"$root.debootstrap.log" 2>&1 || {
    tail -20 "$root.debootstrap.log" >&2; droot_die "debootstrap failed (log: $root.debootstrap.log)"; }
  droot_took "$t" "debootstrap"
  # The host's apt sources replace debootstrap's one-line sources.list.
  rm -f "$root/etc/apt/sources.list"
  while read -r f; do cp "$f" "$root$f"; done < <(droot_apt_sources)
  t=$SECONDS
  droot_run "$root" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq ${DROOT_BASE_PACKAGES[*]} >/dev/null && apt-get clean" ||
    droot_die "installing ${DROOT_BASE_PACKAGES[*]} in the fresh root failed"
  droot_took "$t" "installing ${DROOT_BASE_PACKAGES[*]}"
  if [ "$use_cache" = 1 ]; then
    rm -f "$DROOT_CACHE_DIR/$DROOT_SUITE"-minbase-*.tar.zst
    if ! { tar -C "$root" --numeric-owner --xattrs --acls -cf - . | zstd -q -T0 -3 >"$tarball.tmp" &&
           mv "$tarball.tmp" "$tarball"; }; then
      rm -f "$tarball.tmp"; droot_die "writing $tarball failed"
    fi
    droot_say "cached the pristine root as $tarball"
  fi
  exec {lock}>&-
}

# pip's configuration files, as `pip config list -v` names them (global and user
# variants; the "site" one belongs to that interpreter, not to the machine).
droot_pip_files() {
  local pip
  pip=$(command -v pip || command -v pip3 || true)
  [ -n "$pip" ] || return 0
  "$pip" config list -v 2>/dev/null |
    sed -n "s/^For variant '\(global\|user\)', will try loading '\(.*\)'$/\2/p" |
    while read -r f; do [ -f "$f" ] && printf '%s\n' "$f"; done
  return 0
}

# Absolute paths in the values of those files (index and find-links folders, the
# constraint file, the cert bundle), file:// URLs included.
droot_pip_paths() {
  local f
  droot_pip_files | while read -r f; do
    sed -n 's/^[^#;[][^=]*=\(.*\)$/\1/p' "$f" | tr '[:blank:]' '\n' | sed -n 's|^\(file://\)\{0,1\}\(/.*\)$|\2|p'
  done | sed 's|\(.\)/$|\1|' | sort -u
}

# Make $1 a fresh Debian 12 root (see the top of this file).  $2: 1 to use the cache.
droot_create() {
  local root=$1 use_cache=${2:-1} f p
  mkdir -p "$root"
  droot_pristine "$root" "$use_cache"
  # The network's settings, as every machine here has them.
  rm -f "$root/etc/apt/sources.list"
  while read -r f; do cp "$f" "$root$f"; done < <(droot_apt_sources)
  cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
  for f in /usr/local/share/ca-certificates/*.crt; do
    [ -f "$f" ] && cp "$f" "$root/usr/local/share/ca-certificates/"
  done
  droot_run "$root" update-ca-certificates >"$root.ca.log" 2>&1 || {
    cat "$root.ca.log" >&2; droot_die "update-ca-certificates failed in the root"; }
  DROOT_BINDS=()
  while read -r f; do
    mkdir -p "$root$(dirname "$f")"; cp "$f" "$root$f"
  done < <(droot_pip_files)
  while read -r p; do
    if [ -d "$p" ]; then
      # A local index or find-links folder: bind-mount it.  A PEP 503 index's pages
      # (".../simple/NAME/") link to files beside "simple": mount the index's top.
      case $p in */simple) [ -d "${p%/simple}" ] && p=${p%/simple} ;; esac
      DROOT_BINDS+=("$p")
    elif [ -f "$p" ] && [ ! -e "$root$p" ]; then
      mkdir -p "$root$(dirname "$p")"; cp "$p" "$root$p"    # e.g. a constraints file
    fi
  done < <(droot_pip_paths)
}

# The commit droot_clone will take from checkout $1 (HEAD); says so when the working
# tree has uncommitted changes, which are not part of it.
droot_commit() {
  local commit
  commit=$(git -C "$1" rev-parse HEAD)
  if [ -n "$(git -C "$1" status --porcelain --untracked-files=no)" ]; then
    droot_say "note: uncommitted changes in $1 are NOT checked (this clones commit ${commit:0:12})"
  fi
  printf '%s\n' "$commit"
}

# droot_clone CHECKOUT COMMIT ROOT DIR: `git clone` of the checkout into DIR inside ROOT,
# which must come out at COMMIT.
droot_clone() {
  git clone -q "$1" "$3$4" || droot_die "git clone $1 failed"
  [ "$(git -C "$3$4" rev-parse HEAD)" = "$2" ] ||
    droot_die "the clone of $1 is not at ${2:0:12} (did HEAD move during the check?)"
  droot_say "cloned $1 at ${2:0:12} into $4"
}

# A private /dev/kvm node at $1 (mode $2, group $3 as a number or a name of the host),
# to be bind-mounted over the root's /dev/kvm: changing its owner or mode inside the
# root must not change the host's node, which other users' QEMU needs.
droot_kvm_node() {
  local major minor
  [ -c /dev/kvm ] || return 1
  major=$((16#$(stat -c %t /dev/kvm))); minor=$((16#$(stat -c %T /dev/kvm)))
  rm -f "$1"
  mknod -m "$2" "$1" c "$major" "$minor"
  chown "root:$3" "$1"
}

# The mount and pivot_root sequence droot_run executes as PID 1 of the new namespaces.
# Arguments: ROOT KVM_NODE(or "") BIND... -- CMD...
# shellcheck disable=SC2016
DROOT_ENTER='set -euo pipefail
r=$1 kvm=$2; shift 2
binds=(); while [ "$1" != -- ]; do binds+=("$1"); shift; done; shift
mount --bind "$r" "$r"
mount -t proc proc "$r/proc"
mount -t sysfs sysfs "$r/sys"
mount --rbind /dev "$r/dev"
mount --make-rslave "$r/dev"
[ -z "$kvm" ] || mount --bind "$kvm" "$r/dev/kvm"
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$r/run"
for b in ${binds[@]+"${binds[@]}"}; do
  mkdir -p "$r$b"
  mount --bind "$b" "$r$b"
  mount -o remount,bind,ro "$r$b"
done
cd "$r"
mkdir -p .oldroot
pivot_root . .oldroot
umount -l /.oldroot
rmdir /.oldroot
cd /
exec "$@"'

# droot_argv ROOT CMD...: sets DROOT_ARGV to the command that runs CMD inside ROOT with
# its own PID and mount namespaces, a clean environment (CI passed through) and
# default signal handling.  When CMD ends (or unshare dies: --kill-child) every
# process inside is killed and every mount made for it disappears with the
# namespace.  DROOT_KVM: the /dev/kvm node to give it; DROOT_TIMEOUT: seconds after
# which `timeout` stops it all (exit 124).  Run it as "${DROOT_ARGV[@]}" (also with &).
droot_argv() {
  local root=$1; shift
  local envs=(PATH="$DROOT_PATH" HOME=/root LANG=C.UTF-8 TERM="${TERM:-dumb}")
  [ -n "${CI+x}" ] && envs+=(CI="$CI")
  [ -n "${BACKUPKIT_TEST_S3_PORT_SHIFT:-}" ] &&
    envs+=(BACKUPKIT_TEST_S3_PORT_SHIFT="$BACKUPKIT_TEST_S3_PORT_SHIFT")
  DROOT_ARGV=()
  [ -n "${DROOT_TIMEOUT:-}" ] && DROOT_ARGV+=(timeout --kill-after=30 "$DROOT_TIMEOUT")
  DROOT_ARGV+=(unshare --pid --fork --kill-child --mount --propagation private
    bash -c "$DROOT_ENTER" droot-enter "$root" "${DROOT_KVM:-}" ${DROOT_BINDS[@]+"${DROOT_BINDS[@]}"} --
    env -i --default-signal "${envs[@]}" "$@")
}

# droot_run ROOT CMD...: run that command and return its status.
droot_run() { droot_argv "$@"; droot_wait "${DROOT_ARGV[@]}"; }

# droot_wait CMD...: run CMD and return its status, in the background with `wait`, so
# that a signal to the calling script runs its trap at once rather than after CMD;
# the trap calls droot_stop_job to end CMD.
DROOT_JOB=
droot_wait() {
  local rc=0
  "$@" &
  DROOT_JOB=$!
  wait "$DROOT_JOB" || rc=$?
  DROOT_JOB=
  return "$rc"
}
droot_stop_job() {
  if [ -n "$DROOT_JOB" ] && kill -0 "$DROOT_JOB" 2>/dev/null; then
    kill -TERM "$DROOT_JOB" 2>/dev/null || true  # unshare: its namespace dies with it
    wait "$DROOT_JOB" 2>/dev/null || true
  fi
  DROOT_JOB=
}
