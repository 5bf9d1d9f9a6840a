#!/usr/bin/env bash
# The main job, end to end, on this machine: set up, start a demo VM, back it up
# full and incremental into a local repository, restore both, verify.
#
#   bash scripts/demo.sh            # repository in ./demo-repo, images in ./demo-work
#   DEMO_DIR=/srv/x bash scripts/demo.sh
#
# The demo VM has no guest OS: "guest writes" go through QEMU's block layer
# (HMP qemu-io), exactly as a guest's writes would.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

DIR=${DEMO_DIR:-$PWD}
WORK="$DIR/demo-work"
REPO="$DIR/demo-repo"
VM=backupkit-demo
URI=qemu:///system
mkdir -p "$WORK"
say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

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
