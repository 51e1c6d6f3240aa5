#!/bin/bash
# Build the comparison images for the boot benchmark (bench/boot, `make bench-boot`):
#
#   image/variants/build-variant.sh floor-stock the base of image/build.sh, no agent at all, booted as
#                                               Debian configures it (initramfs-tools, every unit)
#   image/variants/build-variant.sh floor-tuned the same base tuned as image/build.sh tunes the product
#                                               (image/recipe.sh tune_rootfs, tune_initrd),
#                                               no agent: what the agent costs on the tuned image
#   image/variants/build-variant.sh cloudinit   the same base + Debian 12's cloud-init and waagent,
#                                               configured as Debian's Azure images are
#   image/variants/build-variant.sh guest-agent image/build.sh's (tuned) disk + the benchmark's report unit
#   image/variants/build-variant.sh caa         the e2e's CAA-layout pod VM: the base + CAA's unit graph
#                                               with stand-in binaries, then guest-agent installed as an
#                                               image builder would (pip + make install + presets)
#   image/variants/build-variant.sh caa-sftp    the same, as CAA's byom (SFTP) profile builds it
#   image/variants/build-variant.sh caa-deb     CAA's layout as in caa, on Debian 13 (trixie: its kernel,
#                                               systemd and python3), guest-agent's .deb (make deb)
#                                               installed with apt: no pip, no venv, no make install
#   image/variants/build-variant.sh caa-sftp-deb the same with CAA's byom (SFTP) profile
#   image/variants/build-variant.sh caa-chain   the benchmark's incumbent CAA chain: the base + CAA's unit
#                                               graph as CAA enables it, no guest-agent; process-user-data
#                                               and azure-ready are request-for-request stand-ins
#                                               (overlay-caa-chain), the rest caa-standin
#   image/variants/build-variant.sh caa-chain-tuned
#                                               the same chain on the tuned image (floor-tuned's tuning):
#                                               guest-agent against it is the agent's own gain
#   image/variants/build-variant.sh guest-agent-deb
#                                               the guest-agent image with the agent installed from the
#                                               project's .deb by apt (the distribution's python3 and
#                                               libraries, the package's units) instead of the venv
#                                               and `make install`; DEB=path picks the package
#                                               (default: the newest out/deb/guest-agent_*_all.deb)
#
# Output: image/variants/build/<variant>/{disk.raw,vmlinuz,initrd.img,cmdline,manifest.json}; cmdline is
# the kernel command line the image boots with (image/recipe.sh CMDLINE, the same for all; the
# benchmark appends only its systemd.wants=bench-report.service).
# Every variant gets the same benchmark overlay (image/variants/overlay-bench: accounting defaults,
# the provisioning slice, the report unit); the guest-agent image is left as build.sh made it apart
# from those files, which are written into a copy of its disk with debugfs (no mount needed).
#
# The package list, dpkg excludes and base recipe are image/recipe.sh's, sourced by build.sh too;
# the floors and the CAA layouts copy build.sh's cached base rootfs (image/cache/base-*), cloudinit makes
# its own with the incumbents added, caa-deb and caa-sftp-deb one of trixie (image/variants/cache/base-deb-*).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
IMAGE=$(cd "$HERE/.." && pwd)
REPO=$(cd "$IMAGE/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
SOURCES=${SOURCES:-/etc/apt/sources.list.d/debian.sources}
SUITE=bookworm
VARIANT=${1:?usage: build-variant.sh floor-stock|floor-tuned|cloudinit|guest-agent|guest-agent-deb|caa|caa-sftp|caa-chain|caa-chain-tuned|caa-deb|caa-sftp-deb}
CACHE=${VARIANT_CACHE:-$HERE/cache}  # its own bases (cloudinit, deb-<suite>) and .deb caches
IMAGE_CACHE=${IMAGE_CACHE:-$IMAGE/cache}  # build.sh's cache (its bases, wheels)
OUT=${VARIANT_OUT:-$HERE/build/$VARIANT}
# The incumbents: Debian 12's cloud-init 22.4.2 and waagent 2.7.3 (its python3 agent).
# openssh-server: Debian's Azure images have it, and waagent's cloud-init provisioning handler waits
# for an SSH host key (which cloud-init's ssh module regenerates) before it reports Ready.
INCUMBENTS=(cloud-init waagent openssh-server)

log() { printf '[variant %s] %s\n' "$VARIANT" "$*" >&2; }
die() { printf '[variant %s] error: %s\n' "$VARIANT" "$*" >&2; exit 1; }
sha() { sha256sum | cut -c1-16; }
[ "$(id -u)" = 0 ] || die "needs root"
SECONDS=0
mkdir -p "$CACHE/apt" "$OUT"

# copy_tree, remove_tree, guard_tree: as in image/build.sh (image/trees.sh).
# shellcheck source=image/trees.sh
source "$IMAGE/trees.sh"
# PACKAGES, DPKG_EXCLUDES and mmdebstrap_base(): the same recipe as image/build.sh.
# shellcheck source=image/recipe.sh
source "$IMAGE/recipe.sh"

# What a variant is made of; each list of names is said once here.
# caa_image: CAA's layout with guest-agent installed (caa_layout); caa_sftp: as CAA's byom (SFTP)
# profile; deb_variant: its own base of DEB_SUITE (caa-deb below); agent_deb: the agent from make
# deb's package (DEB); tuned: tune_rootfs and tune_initrd, as image/build.sh tunes the product.
caa_image() { case $VARIANT in caa | caa-sftp | caa-deb | caa-sftp-deb) ;; *) return 1 ;; esac; }
caa_sftp() { case $VARIANT in caa-sftp | caa-sftp-deb) ;; *) return 1 ;; esac; }
deb_variant() { case $VARIANT in caa-deb | caa-sftp-deb) ;; *) return 1 ;; esac; }
agent_deb() { deb_variant || [ "$VARIANT" = guest-agent-deb ]; }
tuned() { case $VARIANT in floor-tuned | caa-chain-tuned | guest-agent-deb) ;; *) return 1 ;; esac; }

if agent_deb; then
    DEB=${DEB:-$(newest_deb "$REPO")}
    [ -n "$DEB" ] && [ -f "$DEB" ] || die "no package in $REPO/out/deb: run make deb first (or DEB=path)"
    DEB=$(realpath "$DEB")
    newer=$(cd "$REPO" && find guest_agent units catalog man debian pyproject.toml -type f -newer "$DEB" ! -path '*/__pycache__/*' | head -n3)
    [ -z "$newer" ] || log "warning: $DEB is older than the working tree ($(echo $newer)...): make deb"
fi

bench_overlay_files() { (cd "$HERE/overlay-bench" && find . -type f | LC_ALL=C sort); }

# ---------------------------------------------------------------- guest-agent: copy + debugfs
if [ "$VARIANT" = guest-agent ]; then
    SRC=$IMAGE/build
    [ -f "$SRC/disk.raw" ] || die "no $SRC/disk.raw: run image/build.sh (make image) first"
    log "copy $SRC/disk.raw (inputs $(cat "$SRC/inputs.sha256" 2>/dev/null))"
    guard_tree "$OUT/disk.raw.tmp"
    cp --sparse=always "$SRC/disk.raw" "$OUT/disk.raw.tmp"
    cmds=$(mktemp); on_exit 'rm -f "$cmds"'
    # mkdir for every directory of the overlay (errors for existing ones are harmless), then files.
    (cd "$HERE/overlay-bench" && find . -mindepth 1 -type d | LC_ALL=C sort | sed 's|^\.|mkdir |') > "$cmds"
    bench_overlay_files | while read -r f; do
        p=${f#.}
        printf 'rm %s\nwrite %s %s\n' "$p" "$HERE/overlay-bench/$f" "$p"
        # debugfs copies the mode of the source file; owner root.
        printf 'set_inode_field %s uid 0\nset_inode_field %s gid 0\n' "$p" "$p"
    done >> "$cmds"
    debugfs -w -f "$cmds" "$OUT/disk.raw.tmp" >/dev/null 2>"$OUT/debugfs.log" || die "debugfs failed (see $OUT/debugfs.log)"
    e2fsck -fn "$OUT/disk.raw.tmp" >/dev/null || die "e2fsck after debugfs"
    mv "$OUT/disk.raw.tmp" "$OUT/disk.raw"
    cp "$SRC/vmlinuz" "$SRC/initrd.img" "$SRC/cmdline" "$OUT/"
    "$PY" - "$SRC/manifest.json" "$OUT/manifest.json" <<'PYEOF'
import json, sys
m = json.load(open(sys.argv[1]))
json.dump({"variant": "guest-agent", "source": "image/build.sh", "inputs": m["inputs"],
           "rootfs_mib": m["rootfs_mib"], "packages": m["packages"]}, open(sys.argv[2], "w"), indent=2)
PYEOF
    log "done in $SECONDS s"
    exit 0
fi

# ---------------------------------------------------------------- CAA layout (caa_image)
# CAA's pod VM as its mkosi build lays it out (cloud-api-adaptor fbdde756, src/cloud-api-adaptor/podvm/):
# files/ (units in /etc/systemd/system and the multi-user.target.wants symlinks it ships, tmpfiles,
# kata defaults), the system image's mkosi.skeleton (30-coco.preset, process-user-data's
# 10-override.conf; afterburn-checkin.service with CAA's override and preset line, as an image from
# CAA's tree has them on a distribution that packages afterburn) and, for the SFTP profile,
# mkosi.skeleton-sftp; every binary is a stand-in (overlay-caa/usr/local/libexec/caa-standin).
# guest-agent then goes in the way an image builder adds a package: pip into a venv and
# `make install DESTDIR=... PREFIX=/usr` (caa, caa-sftp) or apt_install_deb of the .deb (caa-deb,
# caa-sftp-deb), then CAA's and our presets.  Last,
# mkosi.finalize.chroot's enable/disable of process-user-data, after the presets: the order in which
# no preset could undo it (guest-agent's drop-ins have to neutralise the unit instead).
CAA_WANTS=(agent-protocol-forwarder.path api-server-rest.path attestation-agent.path azure-ready.service
    confidential-data-hub.path kata-agent.path process-user-data.service 'run-kata\x2dcontainers.mount'
    scratch-storage.path setup-nat-for-imds.service)
CAA_STANDINS=(kata-agent kata-agent-clean api-server-rest attestation-agent confidential-data-hub
    process-user-data azure-ready setup-nat-for-imds.sh setup-scratch-storage)
# CAA's files/ and skeleton units, the wants symlinks, the stand-in binaries and APF (common to all
# CAA layouts).
caa_units() {
    cp -a --no-preserve=ownership "$HERE/overlay-caa/." "$ROOT/"
    chmod 0755 "$ROOT/usr/local/libexec/caa-standin"
    # (run-kata\x2dcontainers.mount dangles in CAA's tree too: files/ has no such unit.)
    mkdir -p "$ROOT/etc/systemd/system/multi-user.target.wants"
    for u in "${CAA_WANTS[@]}"; do ln -sfn "../$u" "$ROOT/etc/systemd/system/multi-user.target.wants/$u"; done
    for b in "${CAA_STANDINS[@]}"; do ln -sfn ../libexec/caa-standin "$ROOT/usr/local/bin/$b"; done
    # afterburn lives in /usr/bin where a distribution packages it (CAA's override runs that path).
    ln -sfn ../local/libexec/caa-standin "$ROOT/usr/bin/afterburn"
    # APF: the project's stand-in forwarder, as in every other variant.
    install -m 0755 -D "$IMAGE/overlay/usr/local/bin/agent-protocol-forwarder" "$ROOT/usr/local/bin/agent-protocol-forwarder"
    ln -sfn /run/peerpod/policy.rego "$ROOT/etc/kata-opa/default-policy.rego"
    mkdir -p "$ROOT/media/cidata"
}
# `systemctl preset` of the units the given preset files name and the image has (mkosi's preset
# step; its `preset-all` would also apply Debian's 90-systemd.preset, whose "enable everything
# else" default no CAA image has).  Preset files that do not exist are skipped.
caa_presets() {
    local units=()
    mapfile -t units < <(cat "$@" 2>/dev/null | awk '$1 == "enable" || $1 == "disable" { print $2 }' |
        while read -r u; do [ -e "$ROOT/etc/systemd/system/$u" ] || [ -e "$ROOT/usr/lib/systemd/system/$u" ] && echo "$u"; done)
    systemctl --root="$ROOT" preset "${units[@]}"
}
# mkosi.finalize.chroot, after the presets: the SFTP profile enables the .path (provision when
# user-data is uploaded) and adds the SFTP user; the others enable the service.
caa_finalize() {
    if caa_sftp; then
        in_root useradd -r -s /sbin/nologin -d /home/peerpod peerpod
        systemctl --root="$ROOT" enable process-user-data.path
        systemctl --root="$ROOT" disable process-user-data.service
    else
        systemctl --root="$ROOT" disable process-user-data.path
        systemctl --root="$ROOT" enable process-user-data.service
    fi
}
caa_layout() {
    log "CAA layout: units, presets, tmpfiles, stand-ins"
    caa_units
    if caa_sftp; then cp -a --no-preserve=ownership "$HERE/overlay-caa-sftp/." "$ROOT/"; fi
    # e2e-dump and the CAA e2e's test-only units (none enabled: the harness pulls them in with
    # systemd.wants= on the kernel command line).
    install -m 0755 -D "$IMAGE/overlay/usr/local/libexec/e2e-dump" "$ROOT/usr/local/libexec/e2e-dump"
    install -m 0644 -D "$IMAGE/overlay/usr/lib/systemd/system/e2e-dump.service" "$ROOT/usr/lib/systemd/system/e2e-dump.service"
    cp -a --no-preserve=ownership "$HERE/overlay-caa-test/." "$ROOT/"
    chmod 0755 "$ROOT"/usr/local/libexec/e2e-*

    if deb_variant; then
        log "guest-agent: apt-get install ./$(basename "$DEB") (Depends from $SUITE), presets"
        apt_install_deb "$ROOT" "$DEB" "$APT_CACHE"
    else
        log "guest-agent: pip install, make install, presets"
        local wheels=("$IMAGE_CACHE"/wheels/*.whl "$IMAGE"/build/agent-wheel/*.whl)
        [ -f "${wheels[-1]}" ] || die "no agent wheel in image/build/agent-wheel: run image/build.sh (make image) first"
        agent_venv "${wheels[@]}"
        make -s -C "$REPO" install DESTDIR="$ROOT" PREFIX=/usr
    fi
    caa_presets "$ROOT"/usr/lib/systemd/system-preset/{20-coco-sys,30-coco,40-sftp-sys,*guest-agent*}.preset
    caa_finalize
}

# The boot benchmark's CAA chain (caa-chain): CAA's units as CAA enables them and nothing of ours.
# process-user-data and azure-ready are replaced by stand-ins that send CAA's requests
# (overlay-caa-chain/usr/local/libexec/caa-chain, see their docstrings); kata-agent, AA, CDH,
# api-server-rest create the sockets the next .path waits for (caa-standin); APF is the project's
# stand-in forwarder, as in every other variant.
caa_chain_layout() {
    log "CAA chain: CAA's units and presets, stand-in programs, no guest-agent"
    caa_units
    local b
    for b in process-user-data azure-ready; do
        rm -f "$ROOT/usr/local/bin/$b"
        install -m 0755 "$HERE/overlay-caa-chain/usr/local/libexec/caa-chain/$b" "$ROOT/usr/local/bin/$b"
    done
    # CAA's preset (mkosi's preset step), then mkosi.finalize.chroot for a non-SFTP image: the
    # service enabled (already a wants symlink above), the .path not.
    caa_presets "$ROOT/usr/lib/systemd/system-preset/30-coco.preset"
    caa_finalize
}

# The product image with the agent from the Debian package (guest-agent-deb): apt installs the .deb
# and its dependencies (python3-yaml, python3-h11, python3-pyroute2) from the distribution; its
# postinst compiles the bytecode, enables the units and its trigger compiles the catalog.  Then what
# image/build.sh adds besides the agent: image/overlay (the stand-in APF, its test preset, e2e-dump)
# and the presets.
deb_layout() {
    log "guest-agent from $DEB (apt), image/overlay, presets"
    apt_install_deb "$ROOT" "$DEB"
    [ "$(sed -n 's/^ExecStart=//p' "$ROOT/usr/lib/systemd/system/guest-agent.service")" = "/usr/bin/guest-agent run" ] ||
        die "the package's guest-agent.service does not run /usr/bin/guest-agent"
    cp -a --no-preserve=ownership "$IMAGE/overlay/." "$ROOT/"
    chmod 0755 "$ROOT/usr/local/bin/agent-protocol-forwarder" "$ROOT/usr/local/libexec/e2e-dump"
    systemctl --root="$ROOT" preset guest-agent.service guest-agent-imds-nat.service \
        agent-protocol-forwarder.service >/dev/null 2>&1
    in_root guest-agent --version >/dev/null
}

# ---------------------------------------------------------------- Debian-package CAA images
# caa-deb and caa-sftp-deb: the pod VM as CAA builds it, as close as this machine allows.  The
# newest Debian release (DEB_SUITE, default trixie; sid builds too) with its own kernel, systemd and
# python3, everything from apt: mmdebstrap of build.sh's package list less the venv's python3 and
# python3-venv (the agent's package brings python3 and its libraries from the same suite), then
# CAA's layout as in caa/caa-sftp with the agent's .deb (DEB, as for guest-agent-deb) installed by
# apt_install_deb.  The mirror is the host's (host_mirror), with the release's -updates and
# -security suites as an image has them.
# deb_sources: one-line sources for $SUITE from the host's mirrors.
deb_sources() {
    local mirror sec
    mirror=$(host_mirror)
    case "$SUITE" in
    sid | unstable)
        # (sid's Release file is valid for a week only: a mirror that lags behind still builds.)
        echo "deb [check-valid-until=no] $mirror $SUITE main"
        return ;;
    esac
    echo "deb $mirror $SUITE main"
    echo "deb $mirror $SUITE-updates main"
    sec=$(host_suites | awk '$2 ~ /-security$/ { print $1; exit }')
    [ -z "$sec" ] || echo "deb $sec $SUITE-security main"
}
if deb_variant; then
    SUITE=${DEB_SUITE:-trixie}
    # mount (systemd runs /usr/bin/mount for .mount units: CAA's media-cidata.mount, dev-hugepages)
    # and passwd (useradd: the SFTP profile's user): trixie's systemd brings both, sid's (262) neither.
    mapfile -t PACKAGES < <(printf '%s\n' "${PACKAGES[@]}" mount passwd | grep -vx -e python3 -e python3-venv)
    APT_CACHE=$CACHE/apt-$SUITE
    mkdir -p "$APT_CACHE"
    # (.list: mmdebstrap reads a file named *.sources as deb822.)
    SOURCES=$OUT/$SUITE.list
    deb_sources > "$SOURCES"
fi

# own_base NAME APT_CACHE [EXTRA_PACKAGE...]: BASE=$CACHE/base-NAME-<hash of its inputs>, made by
# mmdebstrap_base (PACKAGES and the extra ones, from $SUITE and $SOURCES) unless complete already.
own_base() {
    local name=$1 apt_cache=$2 base_hash
    shift 2
    base_hash=$( {
        echo "suite=$SUITE format=$BASE_FORMAT"; sha256sum "$IMAGE/recipe.sh"
        printf '%s\n' "${PACKAGES[@]}" "$@" "${DPKG_EXCLUDES[@]}"
        (cd "$IMAGE" && find base -type f | LC_ALL=C sort | xargs sha256sum); cat "$SOURCES"
    } | sha)
    BASE=$CACHE/base-$name-$base_hash
    [ ! -f "$BASE/.complete" ] || return 0
    log "mmdebstrap $SUITE${*:+ + $*} -> $BASE"
    remove_tree "$CACHE/base-$name"-*
    build_base "$BASE" "$apt_cache" "$@"
}

# ---------------------------------------------------------------- base rootfs
case "$VARIANT" in
floor-stock | floor-tuned | caa | caa-sftp | caa-chain | caa-chain-tuned | guest-agent-deb)
    # build.sh's own cached base layer (same packages, same excludes, same image/base files).
    BASE=
    for d in "$IMAGE_CACHE"/base-*/; do [ ! -f "$d/.complete" ] || BASE=${d%/}; done
    [ -n "$BASE" ] || die "no complete base in image/cache: run image/build.sh first"
    ;;
cloudinit)
    # build.sh's base recipe, with the incumbents added to the package list.
    own_base cloudinit "$CACHE/apt" "${INCUMBENTS[@]}"
    ;;
caa-deb | caa-sftp-deb)
    own_base "deb-$SUITE" "$APT_CACHE"
    ;;
*) die "unknown variant $VARIANT" ;;
esac
log "base: $BASE"

ROOT=$OUT/rootfs
guard_tree "$ROOT"
remove_tree "$ROOT"
copy_tree "$BASE" "$ROOT"
rm -f "$ROOT/.complete"
cp "$BASE/.packages" "$OUT/packages.txt" 2>/dev/null || in_root dpkg-query -W -f '${Package} ${Version}\n' > "$OUT/packages.txt"
rm -f "$ROOT/.packages"

# ---------------------------------------------------------------- what every image of the project has
# (the non-agent steps of build.sh's layer 2, kept identical): networkd with Azure's routes, no
# gettys, empty resolv.conf, hostname, empty machine-id, fstab.
install -m 0644 -D "$IMAGE/overlay/etc/systemd/network/20-podvm.network" "$ROOT/etc/systemd/network/20-podvm.network"
systemctl --root="$ROOT" enable systemd-networkd.service >/dev/null 2>&1
systemctl --root="$ROOT" mask serial-getty@ttyS0.service serial-getty@ttyS1.service getty@tty1.service >/dev/null 2>&1
rm -f "$ROOT/etc/resolv.conf"; : > "$ROOT/etc/resolv.conf"
echo podvm > "$ROOT/etc/hostname"
: > "$ROOT/etc/machine-id"
printf '/dev/vda / ext4 rw,relatime 0 0\n' > "$ROOT/etc/fstab"

if [ "$VARIANT" = cloudinit ]; then
    log "cloud-init + waagent configuration, stand-in APF after cloud-init"
    cp -a --no-preserve=ownership "$HERE/overlay-cloudinit/." "$ROOT/"
    # The same stand-in forwarder as the guest-agent image (image/overlay), ordered after cloud-init.
    install -m 0755 -D "$IMAGE/overlay/usr/local/bin/agent-protocol-forwarder" "$ROOT/usr/local/bin/agent-protocol-forwarder"
    install -m 0644 -D "$IMAGE/overlay/usr/lib/systemd/system/agent-protocol-forwarder.service" \
        "$ROOT/usr/lib/systemd/system/agent-protocol-forwarder.service"
    # waagent.conf: Debian's package default, as Debian's Azure images ship it (it already says
    # Provisioning.Agent=cloud-init: cloud-init provisions, waagent reports Ready and runs extensions).
    grep -q '^Provisioning.Agent=cloud-init' "$ROOT/etc/waagent.conf" || die "waagent.conf: Provisioning.Agent is not cloud-init"
    systemctl --root="$ROOT" enable agent-protocol-forwarder.service walinuxagent.service \
        cloud-init-local.service cloud-init.service cloud-config.service cloud-final.service >/dev/null 2>&1
fi

if caa_image; then caa_layout; fi
case "$VARIANT" in
caa-chain | caa-chain-tuned) caa_chain_layout ;;
guest-agent-deb) deb_layout ;;
esac
# The packages with what apt added to the base (the agent and its Depends); a base of its own keeps
# those versions only in its .deb cache.
if agent_deb; then in_root dpkg-query -W -f '${Package} ${Version}\n' > "$OUT/packages.txt"; fi
if deb_variant; then prune_apt_cache "$APT_CACHE" "$OUT/packages.txt"; fi

# Kernel, initrd and command line for direct boot (as build.sh does): the tuned rootfs and initrd for
# the variants on the tuned image, initramfs-tools' for the others (tests/e2e/run.py boots the CAA
# layouts with their cmdline too).
KVER=$(ls "$ROOT/lib/modules" | sort -V | tail -n1)
install -m 0644 "$ROOT/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
if tuned; then
    log "tuning (image/recipe.sh tune_rootfs, tune_initrd${TUNE_SKIP:+, skipping $TUNE_SKIP})"
    tune_rootfs
    tune_initrd "$OUT/initrd.img"
else
    install -m 0644 "$ROOT/boot/initrd.img-$KVER" "$OUT/initrd.img"
fi
echo "$CMDLINE" > "$OUT/cmdline"
rm -f "$ROOT"/boot/vmlinuz-* "$ROOT"/boot/initrd.img-* "$ROOT"/vmlinuz* "$ROOT"/initrd.img*

# Size before the benchmark's own files: the figure compared with build.sh's manifest rootfs_mib.
root_kb=$(du -sk "$ROOT" | cut -f1)
caa_image || cp -a --no-preserve=ownership "$HERE/overlay-bench/." "$ROOT/"

size_mb=$(( root_kb / 1024 * 13 / 10 + 256 ))
log "disk: rootfs $((root_kb / 1024)) MiB -> ext4 ${size_mb} MiB"
rm -f "$OUT/disk.raw"
mkfs.ext4 -q -F -L podroot -E root_owner=0:0 -d "$ROOT" "$OUT/disk.raw" "${size_mb}M"
"$PY" - "$OUT/manifest.json" "$VARIANT" "$KVER" "$root_kb" "$OUT/packages.txt" <<'PYEOF'
import json, sys
out, variant, kver, root_kb, pkgs = sys.argv[1:]
json.dump({"variant": variant, "kernel": kver, "rootfs_mib": round(int(root_kb) / 1024, 1),
           "packages": dict(l.split(" ", 1) for l in open(pkgs).read().splitlines() if l)}, open(out, "w"), indent=2)
PYEOF
remove_tree "$ROOT"
log "done in $SECONDS s: $OUT/disk.raw ($(du -sh "$OUT/disk.raw" | cut -f1) allocated; $(dirname "$OUT") holds $(du -sh "$(dirname "$OUT")" | cut -f1))"
