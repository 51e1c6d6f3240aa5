# The base recipe shared by image/build.sh (the pod VM) and image/variants/build-variant.sh (the
# benchmark's cloud-init + waagent and no-agent variants), so every variant differs only in what it
# adds.  Sourced, not run.  Needs: SUITE, SOURCES set by the caller.

RECIPE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# Everything the pod VM needs.  python3-venv brings ensurepip for the agent's venv; tpm2-tools is
# only for checks (the agent talks to /dev/tpmrm0 itself).
PACKAGES=(
    systemd systemd-sysv udev kmod
    python3 python3-venv
    iproute2 nftables tpm2-tools
    linux-image-cloud-amd64 initramfs-tools
)
# Documentation and translations are never read on a pod VM.
DPKG_EXCLUDES=(
    --dpkgopt='path-exclude=/usr/share/man/*'
    --dpkgopt='path-exclude=/usr/share/doc/*'
    --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    --dpkgopt='path-exclude=/usr/share/info/*'
)
# image/base/ is copied in before the kernel is configured: initramfs-tools settings (an initrd with
# only what mounts the root disk: default MODULES=most is several times bigger and slower to unpack).
BASE_FORMAT=2 # bump to force a new base when this script's base recipe changes


# mmdebstrap_base DEST APT_CACHE [EXTRA_PACKAGE...]: the base root file system in DEST.
mmdebstrap_base() {
    local dest=$1 apt_cache=$2
    shift 2
    local include
    include=$(IFS=,; echo "${PACKAGES[*]}${*:+,}$(IFS=,; echo "$*")")
    # merged-usr hook: debootstrap-style /usr symlinks + the tiny usr-is-merged package, instead of
    # the usrmerge package, which drags in perl (~46 MB) for a conversion nothing needs here.
    mmdebstrap --mode=root --variant=apt --format=directory \
        --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
        --include="$include" \
        "${DPKG_EXCLUDES[@]}" \
        --skip=essential/unlink \
        --setup-hook='mkdir -p "$1"/var/cache/apt/archives/' \
        --setup-hook="sync-in '$apt_cache' /var/cache/apt/archives/" \
        --essential-hook="cp -a --no-preserve=ownership '$RECIPE_DIR/base/.' \"\$1\"/" \
        --customize-hook="sync-out /var/cache/apt/archives '$apt_cache'" \
        --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
        --customize-hook='chroot "$1" dpkg-query -W -f "\${Package} \${Version}\n" > "$1"/.packages' \
        "$SUITE" "$dest" "$SOURCES"
}

# in_root CMD...: run CMD chrooted in $ROOT, in a private mount namespace so /proc and /dev go
# away with it.
in_root() {
    unshare --mount --propagation private -- /bin/sh -c '
        root=$1; shift
        mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev" &&
        exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 "$@"
    ' sh "$ROOT" "$@"
}

# agent_venv WHEEL...: pip-install guest-agent from these wheels (its pinned dependencies built on
# the host) into a venv at /opt/guest-agent in $ROOT; /usr/local/bin/guest-agent runs it.
agent_venv() {
    mkdir -p "$ROOT/tmp/wheels"
    cp "$@" "$ROOT/tmp/wheels/"
    in_root python3 -m venv /opt/guest-agent
    in_root /opt/guest-agent/bin/pip install --quiet --no-cache-dir --no-index --find-links /tmp/wheels guest-agent
    # pip and setuptools are only needed to install; the image never installs anything at run time.
    in_root /opt/guest-agent/bin/pip uninstall --quiet --yes pip setuptools
    rm -rf "$ROOT/tmp/wheels"
    # The launcher replaces pip's console script: `python3 -ISB` with the venv's site-packages named
    # in the script (no `site` scan at boot, nothing written at boot), after compiling the bytecode
    # of everything it imports at the level it runs with (guest_agent/launcher.py; `make bench`).
    in_root /opt/guest-agent/bin/python3 -m guest_agent.launcher /opt/guest-agent/bin/guest-agent
    ln -sf /opt/guest-agent/bin/guest-agent "$ROOT/usr/local/bin/guest-agent"
    # Every module of the agent and its dependencies has its bytecode: -B would otherwise hide a
    # compile on every boot (in memory, nothing written, but paid each time).
    local tag missing
    tag=$(in_root /opt/guest-agent/bin/python3 -c 'import sys; print(sys.implementation.cache_tag)')
    missing=$(cd "$ROOT/opt/guest-agent/lib" && find . -name '*.py' ! -path '*/__pycache__/*' | while read -r f; do
        [ -f "$(dirname "$f")/__pycache__/$(basename "$f" .py).$tag.pyc" ] || echo "$f"
    done)
    [ -z "$missing" ] || { echo "agent_venv: no bytecode for: $missing" >&2; return 1; }
    in_root /usr/local/bin/guest-agent --version >/dev/null
}
