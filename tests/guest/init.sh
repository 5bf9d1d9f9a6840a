#!/bin/busybox sh
# /init of the backupkit test guest (see docs/test-guest.md).
#
# Kernel command line switches (all optional):
#   writer=1|0        keep writing checksummed files into /data (default 1)
#   verify=0|1|replay check the data disk and print "BKGUEST-VERIFY: PASS|FAIL ...",
#                     then power off.  1 = strict: `e2fsck -n -f` must be clean
#                     before anything mounts it.  replay = mount once first (replays
#                     the journal, as a restored crash-consistent copy would), then fsck.
#   agent=1|0         start qemu-ga on the virtio-serial port (default 1)
#   probe=1           print "BKGUEST: probe ok" and power off (virt type probe)
#   wsize=KIB         largest file the writer writes, KiB (default 64)
#
# Console lines meant for the host all start with "BKGUEST".

/bin/busybox mkdir -p /bin /sbin /proc /sys /dev /run /tmp /data
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1

say() { echo "BKGUEST: $*"; }
die() {
    echo "BKGUEST-ERROR: $*"
    poweroff -f
    sleep 1000000
}

WRITER=1 VERIFY=0 AGENT=1 PROBE=0 WSIZE=64
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        writer=*) WRITER=${arg#writer=} ;;
        verify=*) VERIFY=${arg#verify=} ;;
        agent=*) AGENT=${arg#agent=} ;;
        probe=*) PROBE=${arg#probe=} ;;
        wsize=*) WSIZE=${arg#wsize=} ;;
    esac
done
say "init started uptime=$(cut -d' ' -f1 /proc/uptime)"

if [ "$PROBE" = 1 ]; then
    say "probe ok"
    poweroff -f
fi

for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done
say "modules loaded uptime=$(cut -d' ' -f1 /proc/uptime)"

# The data disk: the virtio disk whose <serial> is "data" (guest names differ from libvirt's).
DEV=
i=0
while [ $i -lt 100 ]; do
    for s in /sys/block/vd*/serial; do
        [ -f "$s" ] || continue
        if [ "$(cat "$s")" = data ]; then
            b=${s%/serial}
            DEV=/dev/${b##*/}
        fi
    done
    [ -n "$DEV" ] && [ -b "$DEV" ] && break
    DEV=
    i=$((i + 1))
    sleep 0.1
done
[ -n "$DEV" ] || die "no disk with serial 'data'"
say "data disk $DEV"

valid_line() {  # valid_line N SUM: a complete manifest line
    case "$1" in '' | *[!0-9]*) return 1 ;; esac
    [ ${#2} -eq 64 ] || return 1
    case "$2" in *[!0-9a-f]*) return 1 ;; esac
    return 0
}

verify() {
    if [ "$VERIFY" = replay ]; then
        mount -t ext4 "$DEV" /data && umount /data || say "replay mount failed"
    fi
    /usr/sbin/e2fsck -n -f "$DEV" >/tmp/fsck.out 2>&1
    fsck_rc=$?
    # -n skips a pending journal recovery with only a warning, and may still exit 0.
    if [ "$fsck_rc" = 0 ] && grep -qi recovery /tmp/fsck.out; then fsck_rc=journal; fi
    sed 's/^/BKGUEST-FSCK: /' /tmp/fsck.out
    mount -t ext4 -o ro,noload "$DEV" /data || {
        echo "BKGUEST-VERIFY: FAIL fsck_rc=$fsck_rc files=0 bad=0 reason=mount"
        return
    }
    ok=0 bad=0 partial=0
    if [ -f /data/MANIFEST ]; then
        # A last line without its newline was being appended: not a completed file.
        [ -z "$(tail -c 1 /data/MANIFEST)" ] || partial=1
        total=$(wc -l </data/MANIFEST)
        n_line=0
        while read -r n sum; do
            n_line=$((n_line + 1))
            [ $n_line -gt "$total" ] && break
            if ! valid_line "$n" "$sum"; then
                bad=$((bad + 1)); echo "BKGUEST-BAD: malformed manifest line $n_line"; continue
            fi
            got=$(sha256sum "/data/f$n" 2>/dev/null | cut -d' ' -f1)
            if [ "$got" = "$sum" ]; then
                ok=$((ok + 1))
            else
                bad=$((bad + 1)); echo "BKGUEST-BAD: f$n want $sum got ${got:-missing}"
            fi
        done </data/MANIFEST
    fi
    umount /data
    if [ "$fsck_rc" = 0 ] && [ "$bad" = 0 ]; then
        echo "BKGUEST-VERIFY: PASS fsck_rc=0 files=$ok bad=0 partial=$partial"
    else
        echo "BKGUEST-VERIFY: FAIL fsck_rc=$fsck_rc files=$ok bad=$bad partial=$partial"
    fi
}

if [ "$VERIFY" != 0 ]; then
    verify
    poweroff -f
    sleep 1000000
fi

has_ext4() {  # the ext2/3/4 superblock magic 0xEF53 at byte 1080
    [ "$(dd if="$DEV" bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 53ef ]
}
if ! has_ext4; then
    say "mkfs.ext4 $DEV"
    # Few inodes and lazy init keep this quick under TCG; noinit_itable (below) stops
    # the kernel from zeroing inode tables in the background (writes nobody asked for).
    # An explicit UUID and hash seed: otherwise mke2fs blocks in getrandom() for seconds
    # until the guest's entropy pool is ready (slow under TCG, no virtio-rng).
    u=$(cat /proc/sys/kernel/random/uuid)
    /usr/sbin/mke2fs -q -t ext4 -F -N 16384 -U "$u" -E nodiscard,hash_seed="$u" -L bkdata "$DEV" ||
        die "mke2fs failed"
fi
say "mounting uptime=$(cut -d' ' -f1 /proc/uptime)"
mount -t ext4 -o noinit_itable "$DEV" /data || die "mount $DEV failed"
say "mounted $DEV on /data"

if [ "$AGENT" = 1 ]; then
    # No udev: make the by-name link qemu-ga looks for.
    mkdir -p /dev/virtio-ports
    for p in /sys/class/virtio-ports/*; do
        [ -f "$p/name" ] && ln -sf "/dev/${p##*/}" "/dev/virtio-ports/$(cat "$p/name")"
    done
    qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 \
        -t /run -f /run/qemu-ga.pid &
    say "agent started"
fi
say "ready uptime=$(cut -d' ' -f1 /proc/uptime)"

if [ "$WRITER" = 1 ]; then
    n=0
    if [ -f /data/MANIFEST ]; then
        n=$(awk '$1 ~ /^[0-9]+$/ && $1 >= m { m = $1 + 1 } END { print m + 0 }' /data/MANIFEST)
    fi
    say "writer starts at f$n"
    while :; do
        # Content is a function of n only: "backupkit f<n>\n" repeated, cut to size.
        size=$(( (n % WSIZE + 1) * 1024 ))
        yes "backupkit f$n" | head -c $size >/data/f$n
        sync /data/f$n /data  # fsync the file and its directory
        sum=$(sha256sum /data/f$n | cut -d' ' -f1)
        echo "$n $sum" >>/data/MANIFEST
        sync /data/MANIFEST
        [ $((n % 50)) = 0 ] && say "writer at f$n"
        n=$((n + 1))
        sleep 0.2
    done
fi
while :; do sleep 3600; done
