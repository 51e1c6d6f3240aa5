#!/bin/bash
# The disk budget of the image builds and the boot runs (docs/building.md): what a make goal needs,
# what the image trees hold already, what is free; fails before anything is built when the free
# space is short.  Called by the Makefile for `make image`, `make e2e` and `make bench-boot`.
#
#   image/disk-budget.sh GOAL...   check (goals other than image, e2e, bench-boot need nothing)
#   image/disk-budget.sh --report  what the image trees hold, and leftovers that can go
#
# The trees are where build.sh and build-variant.sh put them (IMAGE_CACHE, IMAGE_OUT move
# build.sh's); the boots' work directories go to TMPDIR (/tmp).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${IMAGE_CACHE:-$HERE/cache}
OUT=${IMAGE_OUT:-$HERE/build}
TMP=${TMPDIR:-/tmp}
# The make targets' variants (Makefile): e2e builds the CAA layouts (the last two on trixie, with
# their own base and .debs in image/variants/cache), bench-boot the benchmark's seven.
E2E_VARIANTS=(caa caa-sftp caa-deb caa-sftp-deb)
BENCH_VARIANTS=(guest-agent guest-agent-deb floor-tuned floor-stock cloudinit caa-chain caa-chain-tuned)

# Peaks measured with du during cold builds and runs (docs/building.md), in MiB, with a margin of
# about half: everything an image build holds at its peak (base, .deb cache, wheels, the rootfs
# copy and the disk made from it), what one variant adds (rootfs copy + disk), the cloudinit
# variant's own base and .deb cache, the trixie base and .deb cache of the Debian-package variants,
# and the work directories of the boots (QEMU overlays, logs).
NEED_IMAGE=1500
NEED_VARIANT=900
NEED_CLOUDINIT_BASE=900
NEED_DEB_BASE=450
NEED_E2E_WORK=100
NEED_BENCH_WORK=500
# A rebuild with every cache warm still copies the base and makes a disk.
NEED_REBUILD=1000

log() { printf '[disk] %s\n' "$*" >&2; }
mib() { { du -smc "$@" 2>/dev/null || true; } | tail -n1 | cut -f1; }
# The nearest existing directory at or above $1 (the trees may not exist yet).
existing() {
    local d=$1
    until [ -d "$d" ]; do d=$(dirname "$d"); done
    echo "$d"
}
free_mib() { df -Pm -- "$(existing "$1")" | awk 'NR == 2 { print $4 }'; }
mount_of() { df -P -- "$(existing "$1")" | awk 'NR == 2 { print $6 }'; }
device() { stat -c %d -- "$(existing "$1")"; }

variant_dirs() { local v; for v in "$@"; do echo "$HERE/variants/build/$v"; done; }
# The variants' own bases and .deb caches in image/variants/cache: cloudinit's, and the trixie one
# of the Debian-package variants (build-variant.sh caa-deb).
cloudinit_base_dirs() { ls -d "$HERE"/variants/cache/base-cloudinit-* "$HERE"/variants/cache/apt 2>/dev/null || true; }
deb_base_dirs() { ls -d "$HERE"/variants/cache/base-deb-* "$HERE"/variants/cache/apt-* 2>/dev/null || true; }

# Leftovers no make target reuses: variant directories none of them builds (experiments), a rootfs
# left by a killed build, the work directories of failed e2e runs and of bench-boot runs.
leftovers() {
    local d known=" ${E2E_VARIANTS[*]} ${BENCH_VARIANTS[*]} "
    for d in "$HERE"/variants/build/*/; do
        d=${d%/}
        [ -d "$d" ] || continue
        if [[ $known != *" $(basename "$d") "* ]]; then echo "$d"; elif [ -d "$d/rootfs" ]; then echo "$d/rootfs"; fi
    done
    [ ! -d "$OUT/rootfs" ] || echo "$OUT/rootfs"
    # (A work directory written to in the last hour may be a running boot's.)
    for d in "$TMP"/guest-agent-e2e-* "$TMP"/bootbench-*; do
        [ -d "$d" ] && [ -z "$(find "$d" -maxdepth 2 -newermt '-60 min' -print -quit)" ] && echo "$d"
    done
    return 0
}

report() {
    local l
    log "image trees: $CACHE $(mib "$CACHE") MiB, $OUT $(mib "$OUT") MiB, image/variants/cache $(mib "$HERE/variants/cache") MiB, image/variants/build $(mib "$HERE/variants/build") MiB; $(free_mib "$CACHE") MiB free"
    while read -r l; do [ -z "$l" ] || log "  leftover, not reused by any make target: $l ($(mib "$l") MiB)"; done <<<"$(leftovers)"
}

if [ "${1:-}" = --report ]; then report; exit 0; fi

# The goal that needs most decides (make e2e also makes the image, bench-boot too).
cold=0 held=0 work=0 goal=""
for g in "$@"; do
    case "$g" in
    bench-boot)
        c=$((NEED_IMAGE + ${#BENCH_VARIANTS[@]} * NEED_VARIANT + NEED_CLOUDINIT_BASE))
        h=$(mib "$CACHE" "$OUT" $(cloudinit_base_dirs) $(variant_dirs "${BENCH_VARIANTS[@]}"))
        w=$NEED_BENCH_WORK ;;
    e2e)
        c=$((NEED_IMAGE + ${#E2E_VARIANTS[@]} * NEED_VARIANT + NEED_DEB_BASE))
        h=$(mib "$CACHE" "$OUT" $(variant_dirs "${E2E_VARIANTS[@]}") $(deb_base_dirs))
        w=$NEED_E2E_WORK ;;
    image) c=$NEED_IMAGE h=$(mib "$CACHE" "$OUT") w=0 ;;
    *) continue ;;
    esac
    if [ "$c" -gt "$cold" ]; then cold=$c held=$h work=$w goal=$g; fi
done
[ -n "$goal" ] || exit 0

# What is built already is reused or replaced in place; a rebuild still needs its copy and disk.
need=$((cold - held))
[ "$need" -ge "$NEED_REBUILD" ] || need=$NEED_REBUILD
free=$(free_mib "$CACHE")
if [ "$(device "$CACHE")" = "$(device "$TMP")" ]; then
    need=$((need + work))
    where="on $(mount_of "$CACHE") (image trees and $TMP)"
else
    tmp_free=$(free_mib "$TMP")
    log "make $goal: $work MiB of boot work directories in $TMP, $tmp_free MiB free there"
    if [ "$tmp_free" -lt "$work" ]; then
        log "error: make $goal needs $work MiB free in $TMP; only $tmp_free MiB are"
        report
        exit 1
    fi
    where="on $(mount_of "$CACHE") (image trees)"
fi
uses="$cold MiB of image trees when built from nothing ($held MiB are built already)"
[ "$work" = 0 ] || uses+=" + $work MiB of boot work directories"
log "make $goal: uses up to $uses; needs $need MiB free $where, $free MiB are"
if [ "$free" -lt "$need" ]; then
    log "error: not enough disk for make $goal: $need MiB needed, $free MiB free $where; free space or remove leftovers:"
    report
    exit 1
fi
