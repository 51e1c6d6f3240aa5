#!/usr/bin/env bash
# Build a Debian image with the mkosi Debian ships, the way cloud-api-adaptor's pod VM build
# would take the agent: this directory's mkosi.conf.d/50-guest-agent.conf dropped into an image
# directory laid out as CAA's (podvm/mkosi.images/system/, the .deb in podvm/resources/guest-agent/).
# Then the same image without the drop-in, for the size it adds.  Root; `make mkosi-try`.
#
#   packaging/mkosi/try.sh [DEB]    (default: the newest out/deb/ package)
#
# mkosi runs inside a Debian chroot of RELEASE (default trixie: mkosi 25; bookworm's mkosi 14 knows
# neither PackageDirectories= nor the [Content] layout CAA uses) made by mmdebstrap from the host's
# mirror; the image's apt sources are that mirror's main suite (mkosi's defaults add debian-debug and
# security.debian.org).  The chroot lives in out/mkosi-try/root/ while this runs and is removed on
# every exit; the logs stay in out/mkosi-try/.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
WORK=${MKOSI_TRY_WORK:-$REPO/out/mkosi-try}
RELEASE=${RELEASE:-trixie}

die() { printf '[mkosi-try] error: %s\n' "$*" >&2; exit 1; }
log() { printf '[mkosi-try] %s\n' "$*" >&2; }
# shellcheck source=../../image/trees.sh
. "$REPO/image/trees.sh"

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap --mode=root, chroot)"
DEB=${1:-$(newest_deb "$REPO")}
[ -f "$DEB" ] || die "no package (make deb, or give its path)"
MIRROR=$(host_mirror)

root=$WORK/root
mkdir -p "$WORK"
remove_tree "$root"
guard_tree "$root"
on_exit "remove_tree '$root'"
log "$RELEASE chroot with mkosi (mmdebstrap from $MIRROR)"
run_killable unshare --mount --propagation private -- mmdebstrap --mode=root --variant=apt --format=directory \
    --include=mkosi,reprepro,dpkg-dev,debian-archive-keyring,ca-certificates \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    "$RELEASE" "$root" "deb $MIRROR $RELEASE main" >"$WORK/mmdebstrap.log" 2>&1 ||
    { tail -n 20 "$WORK/mmdebstrap.log" >&2; die "mmdebstrap failed"; }

# CAA's layout: the image directory, our drop-in, the package where the drop-in looks for it.
sys=$root/try/podvm/mkosi.images/system
mkdir -p "$sys/mkosi.conf.d" "$sys/mkosi.sandbox/etc/apt/sources.list.d" "$root/try/podvm/resources/guest-agent"
cp "$DEB" "$root/try/podvm/resources/guest-agent/"
cat >"$sys/mkosi.conf" <<EOT
[Distribution]
Distribution=debian
Release=$RELEASE

[Output]
Format=directory
Output=system

[Content]
Bootable=no
Packages=systemd
EOT
cat >"$sys/mkosi.sandbox/etc/apt/sources.list.d/mkosi.sources" <<EOT
Types: deb
URIs: $MIRROR
Suites: $RELEASE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOT

# in_chroot CMD: CMD in the chroot, whose root is a mount point (mkosi's sandbox remounts / as a
# slave), with proc, sys, dev, a tmpfs /run and /tmp, in a private mount namespace.
in_chroot() {
    run_killable unshare --mount --propagation private -- /bin/sh -c '
        root=$1; shift
        mount --bind "$root" "$root" && mount -t proc proc "$root/proc" &&
        mount --rbind /sys "$root/sys" && mount --rbind /dev "$root/dev" &&
        mount -t tmpfs tmpfs "$root/run" && mount -t tmpfs tmpfs "$root/tmp" &&
        cp /etc/resolv.conf "$root/etc/resolv.conf" &&
        exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 "$@"
    ' sh "$root" "$@"
}

cp "$HERE/mkosi.conf.d/50-guest-agent.conf" "$sys/mkosi.conf.d/"
log "mkosi $(chroot "$root" mkosi --version | cut -d' ' -f2) build with 50-guest-agent.conf (log: $WORK/with.log)"
in_chroot sh -c 'cd /try/podvm/mkosi.images/system && mkosi -f build' >"$WORK/with.log" 2>&1 ||
    { tail -n 30 "$WORK/with.log" >&2; die "mkosi build failed"; }
img=$sys/system
with_kib=$(du -sk --one-file-system "$img" | cut -f1)
log "  $(chroot "$img" dpkg-query -W -f '${Package} ${Version}, ' guest-agent python3 python3-yaml python3-h11 python3-pyroute2 systemd)"
log "  $(chroot "$img" guest-agent --version); units: $(chroot "$img" systemctl is-enabled guest-agent.service guest-agent-imds-nat.service 2>/dev/null | tr '\n' ' ')"
chroot "$img" journalctl --list-catalog e20ce18880bb4dccb24bb5e5ddd79601 | grep -q . || die "the catalog is not compiled in the image"
log "  catalog compiled; presets: $(ls "$img/usr/lib/systemd/system-preset" | tr '\n' ' ')"

rm "$sys/mkosi.conf.d/50-guest-agent.conf"
log "mkosi build without it (log: $WORK/without.log)"
in_chroot sh -c 'cd /try/podvm/mkosi.images/system && mkosi -f build' >"$WORK/without.log" 2>&1 ||
    { tail -n 30 "$WORK/without.log" >&2; die "mkosi build (without) failed"; }
without_kib=$(du -sk --one-file-system "$img" | cut -f1)
log "image (systemd, $RELEASE, directory): $((without_kib / 1024)) MiB without, $((with_kib / 1024)) MiB with guest-agent (+$(((with_kib - without_kib) / 1024)) MiB)"
