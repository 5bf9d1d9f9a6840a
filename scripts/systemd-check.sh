#!/usr/bin/env bash
# systemd-check: does backupkit work as docs/operations.md installs it, under real
# systemd, on a stock Debian 12 libvirt host?
#
#   bash scripts/systemd-check.sh [--keep] [--no-cache] [--timeout SECONDS]
#
# Boots a fresh Debian 12 root (scripts/debian-root.sh: minbase + python3
# ca-certificates git procps and this network's settings) with systemd as PID 1 in
# a container (systemd-nspawn; these machines have no systemd of their own), after
# installing what makes it a stock libvirt host: dbus systemd-sysv
# libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86 (libvirtd socket-
# activated, QEMU as libvirt-qemu, /dev/kvm root:kvm 0660 as udev makes it).  Then,
# from a clone of this checkout's commit (uncommitted changes are NOT included):
#
#   - runs the code blocks of docs/operations.md, "Install" and "Enable", verbatim;
#   - defines a running and a shut-off domain (no guest OS, small qcow2 disks in
#     /var/lib/libvirt/images; KVM when it works there, else TCG) and writes data;
#   - starts every shipped service and checks it succeeds and did its job:
#     backupkit-backup-all, backupkit-backup@ for one domain (systemd-escape'd name:
#     an incremental), backupkit-prune (prune + gc), backupkit-verify;
#   - journal: `journalctl -t backupkit -p err` stays empty while all succeeds; one
#     backup by the template logs at most 3 lines; a backup of a missing domain
#     fails its unit (exit 4) and every err line of that run names the domain;
#   - the timers are enabled and listed by `systemctl list-timers` (also a
#     per-domain one);
#   - `systemctl stop` of a running backup, frozen mid-data by backupkit's fault
#     hook (BACKUPKIT_FAULT_POINT=mid_data, ACTION=stop, in a runtime drop-in): it
#     stops within 10 s, the unit ends inactive (not failed), and nothing is left:
#     no libvirt backup job, no new checkpoint, no scratch file or NBD socket, no
#     partial backup; the next run succeeds.
#
# One line per check (ok / FAILED), then a summary; exit 0 when all pass, 1 when
# any failed (a summary line names them), 2 on usage errors.
#
# Options:
#   --keep             keep the root afterwards (its path is printed)
#   --no-cache         debootstrap anew instead of using the cached pristine root
#   --timeout SECONDS  give up after this long (default 540)
#   -h, --help         this text
#
# Needs root, ~2 GB in /var/tmp, internet access to the Debian and Python package
# indexes.  Installs debootstrap, zstd and systemd-container on the host if missing.
# The container is powered off and its root removed on exit, on failure and when
# interrupted; a root left by a killed run is removed by the next run.  It does not
# register with machined and touches nothing of the host's libvirt; the container
# gets its own /dev/kvm node, so the host's node is never changed.
# shellcheck disable=SC2015,SC2317  # "[ ] && ok || bad": ok returns 0; traps are reachable
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
DROOT_TAG=systemd-check
# shellcheck source=scripts/debian-root.sh
. "$here/scripts/debian-root.sh"

usage() { sed -n '2,/^set -euo/{/^set -euo/d;/^# shellcheck/d;s/^# \{0,1\}//;p}' "$0"; }
droot_options 540 "$@"
[ "$(id -u)" = 0 ] || { echo "systemd-check: run as root (debootstrap, systemd-nspawn)" >&2; exit 2; }

STOCK_PACKAGES=(dbus systemd-sysv libvirt-daemon-system libvirt-daemon-driver-qemu qemu-system-x86)
RUN=bkc-run OFF=bkc-off MISSING=bkc-missing     # dashes: systemd-escape matters
IMAGES=/var/lib/libvirt/images
SCRATCH=/var/lib/backupkit/scratch              # scratch_dir of the installed config
SRC=/root/backupkit                             # the clone: the operator's source tree
start=$SECONDS
commit=$(droot_commit "$here")
droot_host_packages debootstrap zstd systemd-container

WORK='' NSPAWN='' CPID='' WATCHDOG=''
failed=() passed=0
ok() { passed=$((passed + 1)); droot_say "ok: $*"; }
bad() { failed+=("$1"); droot_say "FAILED: $1${2:+: $2}"; }

poweroff() {  # poweroff [now]: a clean poweroff, or (now) kill the container's init
  [ -n "$NSPAWN" ] || return 0
  if kill -0 "$NSPAWN" 2>/dev/null; then
    if [ "${1:-}" = now ]; then
      [ -n "$CPID" ] && kill -KILL "$CPID" 2>/dev/null   # its PID namespace dies with it
    else
      # libvirt-guests would wait up to 2 minutes for the OS-less domain to shut down.
      # shellcheck disable=SC2016  # expanded inside
      [ -n "$CPID" ] && inside 20 'for d in $(virsh list --name); do virsh -q destroy "$d"; done' \
        >/dev/null 2>&1
      [ -n "$CPID" ] && kill -s RTMIN+4 "$CPID" 2>/dev/null   # systemd: poweroff
    fi
    for _ in $(seq 1 150); do kill -0 "$NSPAWN" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$NSPAWN" 2>/dev/null; then
      droot_say "the container did not power off within 30 s: killing it"
      [ -n "$CPID" ] && kill -KILL "$CPID" 2>/dev/null   # the PID namespace dies with its init
      kill -KILL "$NSPAWN" 2>/dev/null || true
    fi
  fi
  wait "$NSPAWN" 2>/dev/null || true
  NSPAWN='' CPID=''
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e   # every step of the cleanup runs, whatever fails
  [ -n "$WATCHDOG" ] && kill "$WATCHDOG" 2>/dev/null
  droot_stop_job
  poweroff "$stop_now"
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
# Interrupted: no clean poweroff, the container is thrown away at once.
stop_now=''
trap 'stop_now=now; droot_say "FAILED: interrupted"; exit 130' INT
trap 'stop_now=now; droot_say "FAILED: terminated (or timed out: --timeout $limit)"; exit 143' TERM

WORK=$(droot_workdir systemd)
# The time bound: TERM to this script, and the container's init killed so that a
# command running inside it returns at once.
( trap 'kill "$s" 2>/dev/null; exit 0' TERM
  sleep "$limit" & s=$!; wait "$s"
  droot_say "FAILED: timed out after $limit s (--timeout)"
  kill -TERM $$; c=$(cat "$WORK/container.pid" 2>/dev/null) && kill -KILL "$c" ) &
WATCHDOG=$!
ROOT=$WORK/root
t=$SECONDS
droot_create "$ROOT" "$use_cache"
droot_took "$t" "the fresh root (with this network's settings)"

t=$SECONDS
droot_run "$ROOT" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends ${STOCK_PACKAGES[*]} >/dev/null" ||
  droot_die "installing ${STOCK_PACKAGES[*]} in the root failed"
droot_took "$t" "installing ${STOCK_PACKAGES[*]}"
droot_clone "$here" "$commit" "$ROOT" "$SRC"

# /dev/kvm as udev makes it on a stock host (root:kvm 0660, the root's kvm group), a
# node of our own: nspawn's --bind of the host's node would let the container change it.
kvm_bind=()
kvm_gid=$(awk -F: '$1 == "kvm" { print $3 }' "$ROOT/etc/group")
if [ -n "$kvm_gid" ] && droot_kvm_node "$WORK/kvm" 0660 "$kvm_gid"; then
  kvm_bind=(--bind="$WORK/kvm:/dev/kvm")
fi
binds=()
for b in ${DROOT_BINDS[@]+"${DROOT_BINDS[@]}"}; do binds+=(--bind-ro="$b"); done

t=$SECONDS
machine=bkcheck-$$
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 env --default-signal systemd-nspawn -D "$ROOT" --boot \
  --keep-unit --register=no -M "$machine" --console=passive \
  ${kvm_bind[@]+"${kvm_bind[@]}"} ${binds[@]+"${binds[@]}"} >"$WORK/nspawn.log" 2>&1 &
NSPAWN=$!
for _ in $(seq 1 100); do
  # shellcheck disable=SC2013  # the file is one line of PIDs
  for c in $(cat /proc/"$NSPAWN"/task/*/children 2>/dev/null); do
    [ "$(cat "/proc/$c/comm" 2>/dev/null)" = systemd ] && CPID=$c
  done
  [ -n "$CPID" ] && break
  kill -0 "$NSPAWN" 2>/dev/null || break
  sleep 0.1
done
[ -n "$CPID" ] || { tail -20 "$WORK/nspawn.log" >&2; droot_die "systemd-nspawn did not start systemd (log above)"; }
echo "$CPID" >"$WORK/container.pid"

# inside [SECONDS] 'SHELL CODE': run it in the container (all its namespaces, root).
inside() {
  local secs=120
  if [ $# -gt 1 ]; then secs=$1; shift; fi
  droot_wait timeout --kill-after=5 "$secs" nsenter -t "$CPID" --all -r -w \
    env -i --default-signal PATH="$DROOT_PATH" HOME=/root LANG=C.UTF-8 \
    bash -c "set -euo pipefail; cd /; $1"
}
state=
for _ in $(seq 1 60); do
  state=$(inside 10 'systemctl is-system-running --wait 2>/dev/null' || true)
  case $state in running|degraded) break ;; esac
  sleep 1
done
case $state in
  running) ok "the container booted systemd to 'running' in $((SECONDS - t)) s" ;;
  *) inside 'systemctl --failed --no-pager' >&2 || true
     droot_die "the container's systemd is '$state', not 'running', after $((SECONDS - t)) s" ;;
esac

# --- Install and enable exactly as docs/operations.md says -------------------------
doc_block() {  # the first indented code block under "## $1" in docs/operations.md
  awk -v h="## $1" '
    $0 == h { s = 1; next }
    s && /^## / { exit }
    s && /^    / { print substr($0, 5); got = 1; next }
    s && got && !/^[[:space:]]*$/ { exit }' "$here/docs/operations.md"
}
install_block=$(doc_block Install) enable_block=$(doc_block Enable)
[ -n "$install_block" ] && [ -n "$enable_block" ] ||
  droot_die "docs/operations.md has no code block under '## Install' or '## Enable'"
t=$SECONDS
if inside 400 "cd $SRC; export DEBIAN_FRONTEND=noninteractive; set -x
$install_block" >"$WORK/install.log" 2>&1; then
  ok "installed as docs/operations.md says ($((SECONDS - t)) s)"
else
  tail -25 "$WORK/install.log" >&2
  droot_die "the Install steps of docs/operations.md failed in the container (output above)"
fi
if inside 60 "set -x
$enable_block" >"$WORK/enable.log" 2>&1; then
  ok "enabled as docs/operations.md says"
else
  cat "$WORK/enable.log" >&2
  droot_die "the Enable steps of docs/operations.md failed in the container (output above)"
fi

# --- Two domains: one running, one shut off -------------------------------------------
domain() {  # domain NAME TYPE: define a domain without a guest OS on a 64 MiB qcow2
  inside "qemu-img create -q -f qcow2 $IMAGES/$1.qcow2 64M
cat >/tmp/$1.xml <<XML
<domain type='$2'><name>$1</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='$IMAGES/$1.qcow2'/><target dev='vda' bus='virtio'/><serial>vda</serial></disk>
<memballoon model='none'/></devices></domain>
XML
virsh -q define /tmp/$1.xml >/dev/null"
}
guest_write() {  # guest_write DOMAIN OFFSET LENGTH BYTE: as the guest would, through QEMU
  inside "virsh -q qemu-monitor-command $1 --hmp \
    'qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"write -P $4 $2 $3\"' >/dev/null"
}
virt=qemu
if [ ${#kvm_bind[@]} -gt 0 ]; then
  domain "$RUN" kvm
  if inside "virsh -q start $RUN >/dev/null 2>&1"; then virt=kvm; else
    inside "virsh -q undefine $RUN >/dev/null; rm -f $IMAGES/$RUN.qcow2"
  fi
fi
if [ "$virt" = qemu ]; then
  domain "$RUN" qemu
  inside "virsh -q start $RUN >/dev/null" || droot_die "cannot start the test domain $RUN"
fi
domain "$OFF" "$virt"
guest_write "$RUN" 0 8M 0x41
inside "qemu-io -f qcow2 -c 'write -P 0x42 1M 8M' $IMAGES/$OFF.qcow2 >/dev/null"
ok "domains: $RUN running ($virt, QEMU as $(inside "ps -o user= -C qemu-system-x86_64 | head -1")), $OFF shut off"

# --- Every shipped service ------------------------------------------------------------
jobinfo() {  # a field of `virsh domjobinfo` of the running domain
  inside "virsh domjobinfo $RUN" | awk -F': *' -v k="$1" '$1 == k { sub(/ +$/, "", $2); print $2 }'
}
unit_state() {  # "ActiveState Result ExecMainStatus" of a unit
  inside "systemctl show -P ActiveState '$1'; systemctl show -P Result '$1'; systemctl show -P ExecMainStatus '$1'" |
    tr '\n' ' ' | sed 's/ $//'
}
errors_logged() { inside 'journalctl --sync; journalctl -q -t backupkit -p err --no-pager' | wc -l; }
# The journal of a unit's latest run: entries of that unit after the journal's end as it
# was just before the run started (mark).  A oneshot unit that succeeded is unloaded
# again at once, so its InvocationID cannot be asked for afterwards.
declare -A MARK=()
mark() { MARK[$1]=$(inside "journalctl -q -n 1 -o export | sed -n 's/^__CURSOR=//p'"); }
run_log() {  # run_log UNIT PRIORITY(0-7): the lines its latest run logged at PRIORITY or below
  # Filtered here, not by journalctl: `--after-cursor` with a match skips the first
  # matching entry (systemd 252).  journald reads a finished service's output
  # asynchronously: read until two reads agree.
  local after='' prev='' cur='' _
  if [ -n "${MARK[$1]:-}" ]; then after="--after-cursor='${MARK[$1]}'"; fi
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    cur=$(inside "journalctl --sync; journalctl -q --no-pager -o json $after" | python3 -c '
import json, sys
unit, prio = sys.argv[1], int(sys.argv[2])
for line in sys.stdin:
    e = json.loads(line)
    if e.get("_SYSTEMD_UNIT") == unit and int(e.get("PRIORITY", 6)) <= prio:
        m = e.get("MESSAGE", "")
        print(m if isinstance(m, str) else bytes(m or []).decode(errors="replace"))' "$1" "$2")
    if [ -n "$cur" ] && [ "$cur" = "$prev" ]; then break; fi
    prev=$cur
    sleep 0.3
  done
  if [ -n "$cur" ]; then printf '%s\n' "$cur"; fi
}
unit_log() {  # unit_log UNIT [N]: the last N lines of its latest run, indented, to stderr
  run_log "$1" 7 2>/dev/null | tail -n "${2:-6}" | sed 's/^/    /' >&2
}
backups() {  # number of backups of domain $1 in the repository
  inside "backupkit --json list $1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["backups"]))'
}
service() {  # service UNIT WHAT: start a oneshot unit, check it succeeded
  local u=$1 st rc=0
  mark "$u"
  inside 300 "systemctl start '$u'" 2>/dev/null || rc=$?
  st=$(unit_state "$u")
  if [ "$rc" = 0 ] && [ "${st% *}" = "inactive success" ]; then
    ok "$u: $2"
    return 0
  fi
  bad "$u" "systemctl start exited $rc, unit $st (ActiveState Result ExecMainStatus), its log:"
  unit_log "$u"
  return 1
}
esc_run=$(inside "systemd-escape $RUN") esc_off=$(inside "systemd-escape $OFF")
esc_missing=$(inside "systemd-escape $MISSING")

if service backupkit-backup-all.service "backed up every domain"; then
  [ "$(backups "$RUN")" = 1 ] && [ "$(backups "$OFF")" = 1 ] &&
    ok "backup-all: one backup each of $RUN (running) and $OFF (shut off)" ||
    bad "backup-all: expected one backup each of $RUN and $OFF" "$(inside 'backupkit list' 2>&1 | tail -5)"
fi
guest_write "$RUN" 16M 1M 0x43
if service "backupkit-backup@$esc_run.service" "backed up $RUN (instance $esc_run)"; then
  mode=$(inside "backupkit --json show $RUN latest" | python3 -c 'import json,sys; print(json.load(sys.stdin)["mode"])')
  [ "$mode" = incremental ] && ok "backupkit-backup@: the second backup of $RUN is incremental" ||
    bad "backupkit-backup@: the second backup of $RUN is $mode, not incremental"
  # Operators read one line per backup; a multi-line summary at info is noise (issue 24).
  n=$(run_log "backupkit-backup@$esc_run.service" 6 | wc -l)
  [ "$n" -le 3 ] && ok "backupkit-backup@: one backup logs $n lines (at most 3)" ||
    { bad "backupkit-backup@: one backup logs $n lines to the journal (want at most 3)"
      run_log "backupkit-backup@$esc_run.service" 6 | head -4 | sed 's/^/    /' >&2; }
fi
service backupkit-prune.service "pruned by the config's policy, then gc" || true
service backupkit-verify.service "verified the repository" || true

n=$(errors_logged)
[ "$n" = 0 ] && ok "journalctl -t backupkit -p err is empty after successful runs" ||
  { bad "journalctl -t backupkit -p err has $n lines after runs that should all succeed"
    inside 'journalctl -q -t backupkit -p err --no-pager -o cat' | tail -5 | sed 's/^/    /' >&2; }
[ "$(inside 'journalctl -q -t backupkit -p info --no-pager' | wc -l)" -gt 0 ] &&
  ok "the services log at info level under the identifier backupkit" ||
  bad "no info-level lines from the services under -t backupkit"

# A failing run: a domain that does not exist (exit 4) fails its unit and logs at err.
mark "backupkit-backup@$esc_missing.service"
rc=0; inside "systemctl start 'backupkit-backup@$esc_missing.service'" 2>/dev/null || rc=$?
st=$(unit_state "backupkit-backup@$esc_missing.service")
[ "$rc" != 0 ] && [ "$st" = "failed exit-code 4" ] &&
  ok "a backup of a missing domain fails its unit (exit 4)" ||
  bad "a backup of a missing domain: systemctl start exited $rc, unit $st (want failed exit-code 4)"
# Every err line of that run names the domain (as backup --all does), and there is one.
lines=$(run_log "backupkit-backup@$esc_missing.service" 3)
if [ -n "$lines" ] && ! grep -vqF "$MISSING" <<<"$lines"; then
  ok "that failure is logged at err, naming the domain: $(head -1 <<<"$lines")"
else
  bad "the failed run of $MISSING: want err lines that all name the domain" \
    "got: $(printf '%s' "$lines" | head -3 | tr '\n' '|')"
fi
inside "systemctl reset-failed 'backupkit-backup@$esc_missing.service'" || true

# --- Timers ------------------------------------------------------------------------------
inside "systemctl enable --now 'backupkit-backup@$esc_off.timer'" >/dev/null 2>&1 ||
  bad "systemctl enable --now backupkit-backup@$esc_off.timer failed"
timers=$(inside "systemctl list-timers --all --no-pager 'backupkit*'")
for tm in backupkit-backup-all.timer backupkit-prune.timer backupkit-verify.timer "backupkit-backup@$esc_off.timer"; do
  if grep -qF "$tm" <<<"$timers" && [ "$(inside "systemctl is-enabled '$tm'")" = enabled ]; then
    ok "systemctl list-timers lists $tm (enabled, next: $(grep -F "$tm" <<<"$timers" | awk '{print $2, $3}'))"
  else
    bad "$tm is not enabled or not in systemctl list-timers"
  fi
done
inside "systemctl disable --now 'backupkit-backup@$esc_off.timer'" >/dev/null 2>&1 || true

# --- systemctl stop in the middle of a live backup -------------------------------------
u="backupkit-backup@$esc_run.service"
guest_write "$RUN" 24M 8M 0x44             # an incremental of 8 chunks: mid_data comes
cps_before=$(inside "virsh -q checkpoint-list $RUN --name | sort | tr '\n' ' '")
n_before=$(backups "$RUN")
mark "$u"
inside "mkdir -p '/run/systemd/system/$u.d'
printf '[Service]\nEnvironment=BACKUPKIT_FAULT_POINT=mid_data BACKUPKIT_FAULT_ACTION=stop\n' \
  >'/run/systemd/system/$u.d/zz-systemd-check-fault.conf'
systemctl daemon-reload
systemctl start --no-block '$u'"
pid='' pstate=''
for _ in $(seq 1 300); do
  pid=$(inside "systemctl show -P MainPID '$u'")
  if [ "${pid:-0}" != 0 ]; then
    pstate=$(inside "awk '{print \$3}' /proc/$pid/stat 2>/dev/null" || true)
    [ "$pstate" = T ] && break
  fi
  [ "$(inside "systemctl show -P ActiveState '$u'")" = failed ] && break
  sleep 0.1
done
inside "rm -f '/run/systemd/system/$u.d/zz-systemd-check-fault.conf'; systemctl daemon-reload"
if [ "$pstate" != T ]; then
  bad "stop: the backup never reached mid-data" "unit $(unit_state "$u"), its log:"
  unit_log "$u" 4
else
  job=$(jobinfo Operation)
  scratch_files=$(inside "find $SCRATCH -mindepth 1 | wc -l")
  t=$SECONDS
  rc=0; inside 60 "systemctl stop '$u'" || rc=$?
  took=$((SECONDS - t))
  st=$(unit_state "$u")
  [ "$job" = Backup ] && [ "$scratch_files" -gt 0 ] &&
    ok "stop: frozen mid-data with a libvirt backup job and $scratch_files scratch entries" ||
    bad "stop: frozen mid-data, but job '$job' (want Backup), $scratch_files scratch entries"
  [ "$rc" = 0 ] && [ "$took" -le 10 ] && ok "stop: systemctl stop returned in $took s" ||
    bad "stop: systemctl stop exited $rc after $took s (want 0 within 10 s)"
  [ "${st% *}" = "inactive success" ] && ok "stop: the unit is inactive, not failed ($st)" ||
    bad "stop: the unit is '$st' after systemctl stop (want inactive success: an interrupted run is not a failure)"
  left_job=$(jobinfo 'Job type')
  [ "$left_job" = None ] && ok "stop: no backup job left on $RUN" || bad "stop: a job is left on $RUN: '$left_job'"
  cps_after=$(inside "virsh -q checkpoint-list $RUN --name | sort | tr '\n' ' '")
  [ "$cps_after" = "$cps_before" ] && ok "stop: no checkpoint left behind (still: $cps_after)" ||
    bad "stop: checkpoints changed: before '$cps_before', after '$cps_after'"
  left=$(inside "find $SCRATCH /run /tmp /var/tmp -name 'bk-*' 2>/dev/null | head -5 | tr '\n' ' '")
  [ -z "$left" ] && [ "$(inside "find $SCRATCH -mindepth 1 | wc -l")" = 0 ] &&
    ok "stop: no scratch file or NBD socket left" ||
    bad "stop: left behind: $left$(inside "find $SCRATCH -mindepth 1" | head -3 | tr '\n' ' ')"
  [ "$(backups "$RUN")" = "$n_before" ] && ok "stop: no partial backup in the repository" ||
    bad "stop: the repository has $(backups "$RUN") backups of $RUN, had $n_before"
  inside "systemctl reset-failed '$u'" 2>/dev/null || true
  service "$u" "the next run after the stop succeeds" || true
fi

failed_units=$(inside "systemctl list-units --failed --no-legend --plain 'backupkit*'" | awk '{print $1}' | tr '\n' ' ')
[ -z "$failed_units" ] && ok "systemctl --failed lists no backupkit unit" ||
  bad "systemctl --failed lists: $failed_units"

total=$((passed + ${#failed[@]}))
if [ ${#failed[@]} -eq 0 ]; then
  droot_say "passed: all $total checks under systemd at ${commit:0:12} ($((SECONDS - start)) s)"
  exit 0
fi
droot_say "FAILED: ${#failed[@]} of $total checks ($((SECONDS - start)) s):"
for f in "${failed[@]}"; do printf '  - %s\n' "$f" >&2; done
exit 1
