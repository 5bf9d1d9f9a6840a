#!/usr/bin/env bash
# The main job, end to end, on this machine: set up, start a demo VM, back it up
# full and incremental into a local repository, restore both, verify.
#
#   bash scripts/demo.sh            # repository in ./demo-repo,
#                                   # images in /var/lib/libvirt/images/backupkit-demo
#   DEMO_DIR=/srv/x bash scripts/demo.sh   # both under /srv/x (demo-repo, demo-work)
#
# QEMU runs as the unprivileged libvirt-qemu user, as on every stock host: the images,
# like any VM's, live where that user can reach them (a clone in /root is not).
#
# The demo VM has no guest OS: "guest writes" go through QEMU's block layer
# (HMP qemu-io), exactly as a guest's writes would.  Safe to run again.
#
#   DEMO_GUEST=1 bash scripts/demo.sh   # a real Linux guest instead (docs/test-guest.md):
#       it writes checksummed files while `backup --quiesce` freezes it through the guest
#       agent; each restore is fsck-checked in a verify boot; a restored VM is booted.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

if [ -n "${DEMO_DIR:-}" ]; then
  WORK="$DEMO_DIR/demo-work"
  REPO="$DEMO_DIR/demo-repo"
else
  WORK=/var/lib/libvirt/images/backupkit-demo
  REPO="$PWD/demo-repo"
fi
VM=backupkit-demo
URI=qemu:///system
mkdir -p "$WORK"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

# --- DEMO_GUEST=1: the same job with a real Linux guest (tests/guest/bkguest.py) ---------
guest_py() {  # guest_py 'python code' ARGS...: with tests.guest.bkguest as g, libvirt conn
  PYTHONPATH="$PWD" python -c "import sys, libvirt; from tests.guest import bkguest as g
conn = libvirt.open('$URI'); args = sys.argv[1:]
$1" "${@:2}"
}
demo_guest() {
  gvm=backupkit-demo-guest new=backupkit-demo-guest-restored
  guest_cleanup() {
    guest_py 'for n in args: g.destroy_domain(conn, n)' "$gvm" "$new"
  }
  trap guest_cleanup EXIT
  guest_cleanup
  rm -rf "$WORK" "$REPO"
  mkdir -p "$WORK"

  say "Building the test guest (Debian kernel + busybox initramfs; cached)"
  bash scripts/build-guest.sh
  say "Starting $gvm: it mounts an ext4 data disk and writes checksummed files"
  guest_py 'gu = g.start_guest(conn, g.build_guest(), g.Path(args[1]), name=args[0])
print(f"{gu.name} ({gu.virt_type}): agent answered {gu.boot_seconds:.1f}s after start")' \
    "$gvm" "$WORK"
  count() {  # files the guest's writer has completed, via the agent
    guest_py 'gu = g.Guest(args[0], conn.lookupByName(args[0]), None, None, "", conn=conn)
print(gu.manifest_count())' "$1"
  }
  sleep 3
  echo "guest has written $(count "$gvm") files"

  backupkit --repo "$REPO" init
  cat >"$WORK/backupkit.toml" <<TOML
repository = "$REPO"
scratch_dir = "$WORK/scratch"
TOML
  export BACKUPKIT_CONFIG="$WORK/backupkit.toml"
  say "Full backup, quiesced: freeze through the agent around the checkpoint only"
  local before_full before_inc
  before_full=$(count "$gvm")
  backupkit backup "$gvm" --quiesce
  sleep 3
  say "More writes, incremental backup, quiesced"
  before_inc=$(count "$gvm")
  backupkit backup "$gvm" --quiesce
  echo "guest still writing: $(count "$gvm") files"
  backupkit list "$gvm"
  backupkit --json show "$gvm" latest | python3 -c 'import json,sys; d=json.load(sys.stdin)
print("latest: mode=%(mode)s quiesced=%(quiesced)s freeze_seconds=%(freeze_seconds)s" % d)'

  say "Restore both; the latest also as a new domain $new"
  local full
  full=$(backupkit --json list "$gvm" | python3 -c 'import json,sys; print(json.load(sys.stdin)["backups"][0]["id"])')
  backupkit restore "$gvm" "$full" --target "$WORK/restore-full"
  backupkit restore "$gvm" latest --target "$WORK/restore-latest" --define "$new"

  say "Verify boots: fsck -n clean (no journal replay) and every completed file's checksum"
  local disk want
  for disk in "$WORK/restore-full/vda.qcow2:$before_full" "$WORK/restore-latest/vda.qcow2:$before_inc"; do
    want=${disk##*:}
    guest_py 'import re
ok, text = g.boot_verify(conn, args[0], 120, mode="strict")
line = re.search(r"BKGUEST-VERIFY: .*", text)
print(args[0] + ": " + (line.group(0) if line else "no verdict"))
files = int(re.search(r"files=(\d+)", line.group(0)).group(1)) if line else -1
sys.exit(0 if ok and files >= int(args[1]) else 1)' "${disk%:*}" "$want" \
      || { echo "verify failed for ${disk%:*} (wanted >= $want files)"; exit 1; }
  done

  say "The original is gone; boot the restored domain $new"
  guest_py 'g.destroy_domain(conn, args[0])' "$gvm"
  virsh -c "$URI" start "$new" >/dev/null
  guest_py 'd = conn.lookupByName(args[0]); g.wait_for_agent(d, 120)
gu = g.Guest(args[0], d, None, None, "", conn=conn); import time
c = gu.manifest_count(); time.sleep(3); c2 = gu.manifest_count()
print(f"{args[0]}: agent answers; /data had {c} files, 3 s later {c2}")
sys.exit(0 if c2 > c else 1)' "$new"
  say "Guest demo passed: quiesced full and incremental backups restored clean, and boot."
}
if [ "${DEMO_GUEST:-0}" = 1 ]; then
  demo_guest
  exit 0
fi

cleanup() {
  virsh -c "$URI" destroy "$VM" >/dev/null 2>&1 || true
  virsh -c "$URI" undefine "$VM" --checkpoints-metadata >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup
rm -rf "$WORK" "$REPO"
mkdir -p "$WORK"

say "Creating demo VM $VM (1 GiB qcow2 disk)"
qemu-img create -q -f qcow2 "$WORK/$VM.qcow2" 1G
virt=qemu; [ -w /dev/kvm ] && virt=kvm
cat >"$WORK/$VM.xml" <<XML
<domain type='$virt'><name>$VM</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>
<source file='$WORK/$VM.qcow2'/><target dev='vda' bus='virtio'/></disk>
<memballoon model='none'/></devices></domain>
XML
virsh -c "$URI" define "$WORK/$VM.xml" >/dev/null
virsh -c "$URI" start "$VM" >/dev/null

guest_write() {  # guest_write OFFSET LENGTH BYTE
  virsh -c "$URI" qemu-monitor-command "$VM" --hmp \
    "qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend \"write -P $3 $1 $2\"" >/dev/null
}
snapshot_disk() {  # copy the disk as it is now (the VM is stopped for a moment)
  virsh -c "$URI" destroy "$VM" >/dev/null
  qemu-img convert -O raw "$WORK/$VM.qcow2" "$1"
  virsh -c "$URI" start "$VM" >/dev/null
}

say "Guest writes 64 MiB"
guest_write 0 32M 0x41
guest_write 512M 32M 0x42

say "backupkit init + full backup"
backupkit --repo "$REPO" init
cat >"$WORK/backupkit.toml" <<TOML
repository = "$REPO"
scratch_dir = "$WORK/scratch"
TOML
export BACKUPKIT_CONFIG="$WORK/backupkit.toml"
backupkit backup "$VM"
snapshot_disk "$WORK/ref-full.raw"

say "Guest writes 4 MiB more, incremental backup"
guest_write 100M 4M 0x43
guest_write 700M 64K 0x44
backupkit backup "$VM"
snapshot_disk "$WORK/ref-incremental.raw"

say "Backups in the repository"
backupkit list "$VM"

say "Restore each backup on its own and compare with the disk as it was"
full=$(backupkit --json list "$VM" | python3 -c 'import json,sys; print(json.load(sys.stdin)["backups"][0]["id"])')
backupkit restore "$VM" "$full" --target "$WORK/restore-full"
backupkit restore "$VM" latest --target "$WORK/restore-latest" --format raw
qemu-img compare -f raw "$WORK/ref-full.raw" "$WORK/restore-full/vda.qcow2"
qemu-img compare -f raw "$WORK/ref-incremental.raw" "$WORK/restore-latest/vda.raw"

say "Verify every chunk"
backupkit verify --data

say "Checkpoints left on the VM (one: the latest backup's)"
backupkit checkpoint list "$VM"

say "Demo passed: full and incremental backups restored identical to the disk."
