#!/usr/bin/env bash
# A real S3 server for the tests: a one-node Ceph RADOS Gateway on 127.0.0.1 (Debian's
# Ceph 16, no cephadm, no systemd).  Idempotent: installs what is missing, bootstraps a
# mon and an OSD once, (re)starts whichever daemon is not running, makes sure the test
# user and bucket exist, and writes the environment the tests read to $ENV_FILE:
#
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION,
#   BACKUPKIT_TEST_S3_BUCKET, BACKUPKIT_TEST_S3_CEPH_CONF (the cluster's ceph.conf: tests
#   that kill a gateway start a second radosgw of their own with it, tests/s3rig.py)
#
#   bash scripts/start-s3.sh          start (or check) the gateway
#   bash scripts/start-s3.sh --stop   stop it: rgw, osd, mon (SIGKILL after 15 s each)
#
# State (mon store, the OSD's sparse 20 GiB bluestore file, logs, pid files) lives in
# $STATE, never in the repository.  Daemons are stopped only through their pid files.
# The recipe and its gotchas: /work/shared/HOST-FACTS.md, "A real S3 server here".
set -euo pipefail

STATE=${BACKUPKIT_TEST_S3_STATE:-/var/lib/backupkit-test-s3}
RUN=/run/backupkit-test-s3
ENV_FILE=$RUN/env
CONF=$STATE/ceph.conf
# BACKUPKIT_TEST_S3_PORT_SHIFT moves every port, so that a second gateway can run on the
# same host (scripts/fresh-check.sh's root while the host runs its own); it takes effect
# when the state is first made.
PORT_SHIFT=${BACKUPKIT_TEST_S3_PORT_SHIFT:-0}
MON_PORT=$((13300 + PORT_SHIFT))          # msgr2; msgr1 on MON_PORT+1
RGW_PORT=$((17480 + PORT_SHIFT))
OSD_PORTS=($((16800 + PORT_SHIFT)) $((16899 + PORT_SHIFT))) # other ports: ms_bind_port_min/max
ACCESS_KEY=BKTESTACCESSKEY00001
SECRET_KEY=bktest/secret/key/only/for/the/local/test/gateway
BUCKET=backupkit-test
REGION=us-east-1
ENDPOINT=http://127.0.0.1:$RGW_PORT

say() { echo "start-s3: $*" >&2; }

# One start or stop at a time (several worktrees may run their tests at once).
mkdir -p "$RUN"
exec 9>"$RUN/.lock"
flock 9

alive() { # alive NAME: the daemon whose pid file is $RUN/NAME.pid runs (and is ours:
  # after a reboot a stale pid file may name an unrelated process)
  local f=$RUN/$1.pid
  [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$(cat "$f")/cmdline" 2>/dev/null | grep -q -- "-c $CONF"
}

stop_one() { # stop_one NAME: SIGTERM, then SIGKILL after 15 s
  local f=$RUN/$1.pid pid
  alive "$1" || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 150); do
    kill -0 "$pid" 2>/dev/null || { rm -f "$f"; return 0; }
    sleep 0.1
  done
  say "$1 (pid $pid) ignored SIGTERM for 15 s: SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
  rm -f "$f"
}

if [ "${1:-}" = "--stop" ]; then
  # Without a mon, rgw and the OSD ignore SIGTERM: stop them first.
  for d in rgw osd mon; do stop_one "$d"; done
  rm -f "$ENV_FILE"
  say "stopped"
  exit 0
elif [ $# -gt 0 ]; then
  echo "usage: $0 [--stop]" >&2
  exit 2
fi

# --- packages ------------------------------------------------------------------------
if ! command -v radosgw >/dev/null || ! command -v ceph-osd >/dev/null ||
    ! command -v ceph-mon >/dev/null || ! command -v ceph >/dev/null; then
  say "installing Ceph (radosgw, ceph-mon, ceph-osd, ceph-common)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends radosgw ceph-mon ceph-osd ceph-common \
    uuid-runtime curl >/dev/null
fi

mkdir -p "$STATE/mon" "$STATE/osd" "$STATE/log" "$RUN"

# --- configuration (rewritten every time: the file is ours) --------------------------
[ -s "$STATE/fsid" ] || uuidgen >"$STATE/fsid"
FSID=$(cat "$STATE/fsid")
cat >"$CONF.new" <<EOF
# Written by backupkit's scripts/start-s3.sh: a one-node test cluster on 127.0.0.1.
[global]
fsid = $FSID
mon_host = [v2:127.0.0.1:$MON_PORT,v1:127.0.0.1:$((MON_PORT + 1))]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_port_min = ${OSD_PORTS[0]}
ms_bind_port_max = ${OSD_PORTS[1]}
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
# With auth none, radosgw cannot reach the mon unless the mon client mode is crc.
ms_mon_client_mode = crc
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_crush_chooseleaf_type = 0
# rgw creates 7 pools on its first start: 19 s with the default interval, 6-8 s with this.
paxos_propose_interval = 0.1
# The mon stops itself when its disk has < 5 % free (a shared test machine may).
mon_data_avail_crit = 1
mon_data_avail_warn = 2
run_dir = $RUN
pid_file = $RUN/\$type.\$id.ceph.pid
admin_socket = $RUN/\$cluster-\$name.asok
log_file = $STATE/log/\$cluster-\$name.log
mon_cluster_log_file = $STATE/log/cluster.log
keyring = $STATE/keyring
[mon.a]
mon_data = $STATE/mon/a
[osd.0]
osd_data = $STATE/osd/0
osd_objectstore = bluestore
# bluestore on a sparse file (memstore loses everything on restart and then hangs).
bluestore_block_create = true
bluestore_block_size = 21474836480
osd_memory_target = 268435456
# Settings for client.rgw.a go here, not in [client.rgw].
[client]
# tcp_nodelay: without it a small GET waits ~40 ms (Nagle on the reply against the
# client's delayed ACK: GET 44-51 ms, HEAD 3.5-8 ms, measured).
rgw_frontends = beast endpoint=127.0.0.1:$RGW_PORT tcp_nodelay=1
rgw_data = $STATE/rgw
EOF
mv "$CONF.new" "$CONF"

ceph_() { timeout 30 ceph -c "$CONF" "$@"; }

start_daemon() { # start_daemon NAME COMMAND...: run in the background, record its pid
  local name=$1; shift
  alive "$name" && return 0
  # 9>&-: the daemon must not inherit (and so hold forever) this script's lock.
  setsid "$@" -f -c "$CONF" >>"$STATE/log/$name.out" 2>&1 </dev/null 9>&- &
  echo $! >"$RUN/$name.pid"
}

wait_for() { # wait_for SECONDS WHAT COMMAND...
  local secs=$1 what=$2; shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $end ]; then
      say "$what did not come up within ${secs}s (logs: $STATE/log)"
      exit 1
    fi
    sleep 0.2
  done
}

t0=$EPOCHREALTIME

# --- mon -------------------------------------------------------------------------------
if [ ! -e "$STATE/mon/a/done" ]; then
  rm -rf "$STATE/mon/a"
  monmaptool --create --clobber --fsid "$FSID" \
    --addv a "[v2:127.0.0.1:$MON_PORT,v1:127.0.0.1:$((MON_PORT + 1))]" "$STATE/monmap" >/dev/null
  ceph-mon -c "$CONF" --mkfs -i a --monmap "$STATE/monmap" >/dev/null
  touch "$STATE/mon/a/done"
fi
start_daemon mon ceph-mon -i a
wait_for 30 "the mon" ceph_ mon stat

# --- osd -------------------------------------------------------------------------------
if [ ! -e "$STATE/osd/0/ready" ]; then
  rm -rf "$STATE/osd/0"
  mkdir -p "$STATE/osd/0"
  uuid=$(uuidgen)
  id=$(ceph_ osd new "$uuid")
  if [ "$id" != 0 ]; then
    say "the mon gave the new OSD id $id, expected 0 (remove $STATE to start afresh)"
    exit 1
  fi
  ceph-osd -c "$CONF" -i 0 --mkfs --osd-uuid "$uuid" >>"$STATE/log/osd-mkfs.out" 2>&1
fi
start_daemon osd ceph-osd -i 0
# After a crash the mon may still say "up": ask the OSD itself.
osd_active() { ceph -c "$CONF" --admin-daemon "$RUN/ceph-osd.0.asok" status |
  grep -q '"state": "active"'; }
wait_for 60 "the OSD" osd_active

# --- rgw -------------------------------------------------------------------------------
mkdir -p "$STATE/rgw"
start_daemon rgw radosgw -n client.rgw.a
wait_for 90 "radosgw on $ENDPOINT" curl -sf -o /dev/null "$ENDPOINT/"

# --- test user and bucket ----------------------------------------------------------------
if ! timeout 30 radosgw-admin -c "$CONF" user info --uid=backupkit-test >/dev/null 2>&1; then
  timeout 30 radosgw-admin -c "$CONF" user create --uid=backupkit-test \
    --display-name="backupkit tests" --access-key="$ACCESS_KEY" --secret-key="$SECRET_KEY" \
    >/dev/null
fi
s3() { # s3 METHOD PATH: one signed request; prints the HTTP status
  local how=(-X "$1")
  [ "$1" = HEAD ] && how=(-I)  # -X HEAD would wait for a body that never comes
  curl -s -o /dev/null -w '%{http_code}' "${how[@]}" --aws-sigv4 "aws:amz:$REGION:s3" \
    --user "$ACCESS_KEY:$SECRET_KEY" -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' \
    -H 'Content-Length: 0' --max-time 10 "$ENDPOINT/$2" || true
}
# Right after the user is created the gateway may still refuse its key: retry briefly.
for _ in $(seq 1 50); do
  code=$(s3 HEAD "$BUCKET")
  [ "$code" = 200 ] && break
  if [ "$code" = 404 ]; then
    code=$(s3 PUT "$BUCKET")
    [ "$code" = 200 ] && break
  fi
  sleep 0.2
done
if [ "$code" != 200 ]; then
  say "cannot create the test bucket $BUCKET (HTTP $code; logs: $STATE/log)"
  exit 1
fi

cat >"$ENV_FILE.new" <<EOF
AWS_ACCESS_KEY_ID=$ACCESS_KEY
AWS_SECRET_ACCESS_KEY=$SECRET_KEY
AWS_ENDPOINT_URL_S3=$ENDPOINT
AWS_DEFAULT_REGION=$REGION
BACKUPKIT_TEST_S3_BUCKET=$BUCKET
BACKUPKIT_TEST_S3_CEPH_CONF=$CONF
EOF
mv "$ENV_FILE.new" "$ENV_FILE"
secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
say "gateway answers on $ENDPOINT, bucket $BUCKET (${secs} s; environment in $ENV_FILE)"
