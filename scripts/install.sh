#!/bin/sh
# Install backupkit's systemd units, man pages and example config in their
# standard places.  The Python package itself is installed separately (for
# example "python3 -m venv /opt/backupkit && /opt/backupkit/bin/pip install ." and
# "ln -s /opt/backupkit/bin/backupkit /usr/local/bin/backupkit"): the units run
# plain "backupkit", which systemd finds in /usr/local/bin or /usr/bin.
#
#   scripts/install.sh                      # PREFIX=/usr/local
#   PREFIX=/usr scripts/install.sh          # units in /usr/lib/systemd/system
#   DESTDIR=/tmp/stage scripts/install.sh   # staged install (packaging)
#
# Variables: DESTDIR (staging root, default empty), PREFIX (/usr/local),
# UNITDIR ($PREFIX/lib/systemd/system), MANDIR ($PREFIX/share/man),
# DOCDIR ($PREFIX/share/doc/backupkit), SYSCONFDIR (/etc).
# An existing $SYSCONFDIR/backupkit/backupkit.toml is never overwritten; the
# example is always installed as $DOCDIR/backupkit.toml.example.
set -eu

PREFIX=${PREFIX:-/usr/local}
DESTDIR=${DESTDIR:-}
UNITDIR=${UNITDIR:-$PREFIX/lib/systemd/system}
MANDIR=${MANDIR:-$PREFIX/share/man}
DOCDIR=${DOCDIR:-$PREFIX/share/doc/backupkit}
SYSCONFDIR=${SYSCONFDIR:-/etc}

src=$(cd "$(dirname "$0")/.." && pwd)

say() { printf '%s\n' "$*"; }

install -d -m 0755 "$DESTDIR$UNITDIR" "$DESTDIR$MANDIR/man8" "$DESTDIR$MANDIR/man5" \
    "$DESTDIR$DOCDIR"
for unit in "$src"/systemd/*.service "$src"/systemd/*.timer; do
    install -m 0644 "$unit" "$DESTDIR$UNITDIR/"
    say "installed $DESTDIR$UNITDIR/$(basename "$unit")"
done
install -m 0644 "$src/man/backupkit.8" "$DESTDIR$MANDIR/man8/backupkit.8"
install -m 0644 "$src/man/backupkit.toml.5" "$DESTDIR$MANDIR/man5/backupkit.toml.5"
say "installed $DESTDIR$MANDIR/man8/backupkit.8 $DESTDIR$MANDIR/man5/backupkit.toml.5"
install -m 0644 "$src/config/backupkit.toml" "$DESTDIR$DOCDIR/backupkit.toml.example"

conf="$DESTDIR$SYSCONFDIR/backupkit/backupkit.toml"
if [ -e "$conf" ] || [ -L "$conf" ]; then
    say "kept existing $conf (example: $DESTDIR$DOCDIR/backupkit.toml.example)"
else
    install -d -m 0755 "$DESTDIR$SYSCONFDIR/backupkit"
    install -m 0644 "$src/config/backupkit.toml" "$conf"
    say "installed $conf"
fi

if [ -z "$DESTDIR" ]; then
    found=
    for d in /usr/local/sbin /usr/local/bin /usr/sbin /usr/bin; do
        if [ -x "$d/backupkit" ]; then found=$d/backupkit; break; fi
    done
    if [ -z "$found" ]; then
        say "warning: no backupkit in /usr/local/sbin, /usr/local/bin, /usr/sbin or /usr/bin;" \
            "the units will fail until it is there (e.g. a symlink to a venv's bin/backupkit)" >&2
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
        say "systemctl daemon-reload done"
    fi
    say "enable the nightly backup of every domain with:"
    say "  systemctl enable --now backupkit-backup-all.timer backupkit-prune.timer backupkit-verify.timer"
fi
