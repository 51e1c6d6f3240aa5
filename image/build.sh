#!/bin/bash
# Build the pod VM test image: a bootable Debian 12 raw disk plus its kernel and initrd for
# direct boot under QEMU.  Called by `make image`; needs root (mmdebstrap in root mode, chroot).
#
#   image/build.sh            build if the inputs changed, else say "up to date"
#   FORCE=1 image/build.sh    rebuild the agent layer even if nothing changed
#   FORCE=base image/build.sh also re-run mmdebstrap
#
# Two layers, each skipped when its inputs hash is unchanged:
#   1. base:  mmdebstrap of the package list below -> image/cache/base-<hash>/ (about a minute cold;
#             downloaded .debs are kept in image/cache/apt/ so a re-run does not download again).
#   2. image: copy of the base + the agent venv (wheels built on the host, cached in
#             image/cache/wheels/) + `make install` (units) + image/overlay/ + the tuning of
#             image/recipe.sh (masked units, generators, a minimal initrd; docs/image-tuning.md) -> image/build/{disk.raw,vmlinuz,initrd.img,cmdline}.
# The agent is taken from the working tree at build time, so re-run after changing guest_agent/.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
CACHE=${IMAGE_CACHE:-$HERE/cache}  # IMAGE_CACHE: another cache (the tests' fake bases)
OUT=${IMAGE_OUT:-$HERE/build}  # IMAGE_OUT: build elsewhere (A/B experiments)
PY=${PYTHON:-$REPO/.venv/bin/python}
SUITE=bookworm
# The mirror comes from the host's apt configuration; no host name is written here.
SOURCES=${SOURCES:-/etc/apt/sources.list.d/debian.sources}

log() { printf '[image] %s\n' "$*" >&2; }
die() { printf '[image] error: %s\n' "$*" >&2; exit 1; }
sha() { sha256sum | cut -c1-16; }

# copy_tree, remove_tree, guard_tree, run_killable: no copy or removal leaves the tree's file
# system, nothing stays mounted on any exit path (image/trees.sh).
# shellcheck source=image/trees.sh
source "$HERE/trees.sh"
# PACKAGES, DPKG_EXCLUDES, BASE_FORMAT and mmdebstrap_base(): the recipe shared with the variants.
# shellcheck source=image/recipe.sh
source "$HERE/recipe.sh"

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap --mode=root, chroot)"
[ -r "$SOURCES" ] || die "no apt sources file at $SOURCES (set SOURCES=...)"
for t in mmdebstrap mkfs.ext4 chroot unshare gcc; do command -v "$t" >/dev/null || die "missing tool: $t"; done
[ -x "$PY" ] || die "no Python at $PY (create the project venv first)"

SECONDS=0
mkdir -p "$CACHE/apt" "$CACHE/wheels" "$OUT"

# ---------------------------------------------------------------- inputs
base_hash=$( {
    echo "format=$BASE_FORMAT suite=$SUITE"
    printf '%s\n' "${PACKAGES[@]}" "${DPKG_EXCLUDES[@]}"
    (cd "$HERE" && find base -type f | LC_ALL=C sort | xargs sha256sum)
    cat "$SOURCES"
    mmdebstrap --version 2>&1
} | sha)

# Runtime dependencies: the ranges in pyproject.toml, installed at the exact versions of constraints.txt.
mapfile -t DEPS < <("$PY" - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
EOF
)
[ "${#DEPS[@]}" -gt 0 ] || die "no dependencies found in pyproject.toml"
deps_hash=$( { printf '%s\n' "${DEPS[@]}"; cat "$REPO/constraints.txt"; } | sha)

image_hash=$( (
    echo "base=$base_hash deps=$deps_hash tune_skip=${TUNE_SKIP:-}"
    # Agent sources, units, overlay and this script: content and path, sorted.
    cd "$REPO" && { find Makefile pyproject.toml constraints.txt README.md guest_agent units catalog man image/overlay image/initrd image/build.sh image/recipe.sh \
        -type f ! -name '*.pyc' ! -path '*/__pycache__/*' 2>/dev/null || true; } | LC_ALL=C sort | xargs -r sha256sum
) | sha)

if [ "${FORCE:-}" = "" ] && [ -f "$OUT/disk.raw" ] && [ "$(cat "$OUT/inputs.sha256" 2>/dev/null)" = "$image_hash" ]; then
    log "up to date ($image_hash): $OUT/disk.raw"
    exit 0
fi

# ---------------------------------------------------------------- layer 1: base rootfs
BASE=$CACHE/base-$base_hash
if [ "${FORCE:-}" = base ]; then remove_tree "$BASE"; fi
if [ ! -f "$BASE/.complete" ]; then
    log "base: mmdebstrap $SUITE (${#PACKAGES[@]} packages) -> $BASE"
    # Old bases are dead weight (400+ MB each), and so is a half-built one.
    remove_tree "$CACHE"/base-*
    t=$(date +%s)
    build_base "$BASE" "$CACHE/apt"
    log "base: done in $(( $(date +%s) - t )) s"
else
    log "base: cached $BASE"
fi

# ---------------------------------------------------------------- layer 2: the image rootfs
ROOT=$OUT/rootfs
log "rootfs: copy base"
guard_tree "$ROOT"
remove_tree "$ROOT"
copy_tree "$BASE" "$ROOT"
rm -f "$ROOT/.complete"

# ---------------------------------------------------------------- wheels (built on the host)
# Debian 12 host and image share glibc 2.36 and CPython 3.11, so cp311 wheels built here install in
# the image, where pip installs them offline (--no-index) into the agent venv.
WHEELS=$CACHE/wheels
if [ ! -f "$WHEELS/.deps-$deps_hash" ]; then
    log "wheels: ${DEPS[*]}"
    rm -f "$WHEELS"/*.whl "$WHEELS"/.deps-*
    # (grep: pip warns about every package the machine's extra local indexes lack.)
    "$PY" -m pip wheel --quiet -c "$REPO/constraints.txt" -w "$WHEELS" "${DEPS[@]}" 2> >(grep -v 'is ignored: it is neither' >&2)
    touch "$WHEELS/.deps-$deps_hash"
fi
AGENT_WHEELS=$OUT/agent-wheel
rm -rf "$AGENT_WHEELS"; mkdir -p "$AGENT_WHEELS"
log "wheels: guest-agent from $REPO"
# Build from a scratch copy: setuptools leaves build/ and *.egg-info in the source tree otherwise.
SRC=$(mktemp -d); on_exit 'rm -rf "$SRC"'
(cd "$REPO" && tar -cf - --exclude=__pycache__ pyproject.toml guest_agent $( [ -f README.md ] && echo README.md )) | tar -xf - -C "$SRC"
[ -f "$SRC/README.md" ] || echo "guest-agent" > "$SRC/README.md"
"$PY" -m pip wheel --quiet --no-deps -w "$AGENT_WHEELS" "$SRC" 2> >(grep -v 'is ignored: it is neither' >&2)

log "rootfs: agent venv /opt/guest-agent"
agent_venv "$WHEELS"/*.whl "$AGENT_WHEELS"/*.whl
venv_kb=$(du -sk "$ROOT/opt/guest-agent" | cut -f1)

log "rootfs: units, overlay, presets"
# The systemd side as an image builder gets it: units, drop-ins, preset.  The units run
# /usr/local/bin/guest-agent (where `pip install` puts it; here, the venv link above).
make -s -C "$REPO" install DESTDIR="$ROOT" PREFIX=/usr
# What systemd's package trigger does for a new catalog file: `journalctl -x` explains our entries.
journalctl --root="$ROOT" --update-catalog
cp -a --no-preserve=ownership "$HERE/overlay/." "$ROOT/"
chmod 0755 "$ROOT/usr/local/bin/agent-protocol-forwarder" "$ROOT/usr/local/libexec/e2e-dump"

# Enable by preset, as a package's postinst would (the stand-in APF: image/overlay's test preset).
systemctl --root="$ROOT" preset guest-agent.service guest-agent-imds-nat.service \
    agent-protocol-forwarder.service >/dev/null 2>&1
systemctl --root="$ROOT" enable systemd-networkd.service >/dev/null 2>&1
# No logins on a pod VM, and a getty on the serial console can hang it up mid-report.
systemctl --root="$ROOT" mask getty.target serial-getty@ttyS0.service serial-getty@ttyS1.service >/dev/null 2>&1
# No DNS this early: an empty resolv.conf makes lookups fail at once instead of timing out.
rm -f "$ROOT/etc/resolv.conf"; : > "$ROOT/etc/resolv.conf"
echo podvm > "$ROOT/etc/hostname"
# Empty machine-id: every boot of a fresh overlay is a first boot, as on a new cloud VM.
: > "$ROOT/etc/machine-id"
printf '/dev/vda / ext4 rw,relatime 0 0\n' > "$ROOT/etc/fstab"
log "rootfs: tuning (image/recipe.sh tune_rootfs${TUNE_SKIP:+, skipping $TUNE_SKIP})"
tune_rootfs

# Kernel and initrd for direct boot; the disk does not need them.
KVER=$(ls "$ROOT/lib/modules" | sort -V | tail -n1)
install -m 0644 "$ROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
tune_initrd "$OUT/initrd.img"
rm -f "$ROOT"/boot/vmlinuz-* "$ROOT"/boot/initrd.img-* "$ROOT"/vmlinuz* "$ROOT"/initrd.img*

mv "$ROOT/.packages" "$OUT/packages.txt"

# ---------------------------------------------------------------- disk
root_kb=$(du -sk "$ROOT" | cut -f1)
size_mb=$(( root_kb / 1024 * 13 / 10 + 256 ))
log "disk: rootfs $((root_kb / 1024)) MiB -> ext4 ${size_mb} MiB (sparse)"
rm -f "$OUT/disk.raw"
mkfs.ext4 -q -F -L podroot -E root_owner=0:0 -d "$ROOT" "$OUT/disk.raw" "${size_mb}M"
echo "$CMDLINE" > "$OUT/cmdline"

"$PY" - "$OUT/manifest.json" "$image_hash" "$KVER" "$root_kb" "$venv_kb" "$OUT/packages.txt" <<'EOF'
import json, os, sys
out, h, kver, root_kb, venv_kb, pkgs = sys.argv[1:]
d = os.path.dirname(out)
m = {
    "inputs": h, "kernel": kver,
    "rootfs_mib": round(int(root_kb) / 1024, 1),
    "agent_venv_mib": round(int(venv_kb) / 1024, 1),
    "disk_raw_mib": round(os.path.getsize(os.path.join(d, "disk.raw")) / 2**20, 1),
    "disk_allocated_mib": round(os.stat(os.path.join(d, "disk.raw")).st_blocks * 512 / 2**20, 1),
    "initrd_mib": round(os.path.getsize(os.path.join(d, "initrd.img")) / 2**20, 1),
    "vmlinuz_mib": round(os.path.getsize(os.path.join(d, "vmlinuz")) / 2**20, 1),
    "packages": dict(line.split(" ", 1) for line in open(pkgs).read().splitlines() if line),
}
json.dump(m, open(out, "w"), indent=2)
print(json.dumps({k: v for k, v in m.items() if k != "packages"}))
EOF
remove_tree "$ROOT"   # the disk holds it; keeping 500 MB of loose files buys nothing
echo "$image_hash" > "$OUT/inputs.sha256"
log "done in $SECONDS s: $OUT/disk.raw"
log "disk: $(du -sh --apparent-size "$OUT/disk.raw" | cut -f1) image ($(du -sh "$OUT/disk.raw" | cut -f1) allocated); $OUT holds $(du -sh "$OUT" | cut -f1), $CACHE $(du -sh "$CACHE" | cut -f1)"
