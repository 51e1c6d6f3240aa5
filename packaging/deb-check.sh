#!/usr/bin/env bash
# `make deb-check`: install the package with apt into fresh Debian chroots and use it there, as an
# image build would (packaging/deb-check.sh [RELEASE...], default bookworm trixie; root).
#
# Per release: mmdebstrap --variant=apt with systemd and man-db (what any pod VM image has), then,
# chrooted: `apt-get install ./guest-agent_*.deb` (the distribution's python3 and libraries),
# guest-agent --version, `guest-agent check` of a CAA-shaped user-data, the units enabled
# (`systemctl --root / is-enabled`), the journal catalog compiled by systemd's trigger and
# `journalctl --update-catalog`, `man -w guest-agent`, then `apt-get purge` leaving no unit link.
# The mirror is the host's (apt's index targets); the chroot lives under out/deb-check/ while it
# runs, mmdebstrap's mounts are in a private mount namespace, and the tree is removed on every exit.
#
# DEB=path picks the package (default: the newest out/deb/guest-agent_*_all.deb).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${DEB_CHECK_WORK:-$REPO/out/deb-check}

die() { printf '[deb-check] error: %s\n' "$*" >&2; exit 1; }
log() { printf '[deb-check] %s\n' "$*" >&2; }
# shellcheck source=../image/trees.sh
. "$REPO/image/trees.sh"

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap --mode=root, chroot)"
for t in mmdebstrap unshare apt-get python3; do command -v "$t" >/dev/null || die "missing tool: $t (.ci/apt-deps deb)"; done

if [ -z "${DEB:-}" ]; then
    dir=$REPO/out/deb
    DEB=$(ls -t "$dir"/guest-agent_*_all.deb 2>/dev/null | head -n1) || true
    [ -n "$DEB" ] || die "no package in $dir (make deb)"
fi
[ -f "$DEB" ] || die "no such package: $DEB"
DEB=$(realpath "$DEB")

# The host's Debian mirror: the URI apt fetches its main suite from (no host name is written here).
MIRROR=$(host_mirror)

RELEASES=("$@")
[ ${#RELEASES[@]} -gt 0 ] || RELEASES=(bookworm trixie)

# What the chroot gets besides the package: a sample user-data as CAA renders it (tests/e2e/userdata.py).
mkdir -p "$WORK"
remove_tree "$WORK/in"
guard_tree "$WORK/in"
mkdir -p "$WORK/in"
cp "$DEB" "$WORK/in/"
(cd "$REPO" && python3 -c 'import sys; from tests.e2e.userdata import valid; sys.stdout.buffer.write(valid()[0])') \
    >"$WORK/in/user-data"
cp "$REPO/packaging/deb-check.inside.sh" "$WORK/in/inside.sh"
on_exit "rm -rf --one-file-system '$WORK/in'"

log "package: $DEB"
log "  Depends: $(dpkg-deb -f "$DEB" Depends)"
failed=()
for rel in "${RELEASES[@]}"; do
    root=$WORK/$rel
    remove_tree "$root"
    guard_tree "$root"
    log "$rel: mmdebstrap --variant=apt from $MIRROR, then the checks (log: $WORK/$rel.log)"
    rc=0
    # In a private mount namespace: mmdebstrap's /proc, /sys and /dev mounts in the chroot go away
    # with it, even when it is killed; the checks run as mmdebstrap's customize hooks.
    run_killable unshare --mount --propagation private -- mmdebstrap --mode=root --variant=apt \
        --format=directory --include=systemd,man-db \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --customize-hook="copy-in $(printf '%q ' "$WORK/in/"*) /tmp" \
        --customize-hook='chroot "$1" /bin/sh /tmp/inside.sh' \
        "$rel" "$root" "deb $MIRROR $rel main" >"$WORK/$rel.log" 2>&1 || rc=$?
    grep '^\[inside\]' "$WORK/$rel.log" >&2 || true
    remove_tree "$root"
    if [ "$rc" = 0 ]; then log "$rel: ok"; else log "$rel: FAILED (exit $rc; $WORK/$rel.log)"; failed+=("$rel"); fi
done
[ ${#failed[@]} = 0 ] || die "failed on: ${failed[*]}"
log "all passed: ${RELEASES[*]}"
