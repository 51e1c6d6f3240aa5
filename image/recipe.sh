# The base recipe shared by image/build.sh (the pod VM) and image/variants/build-variant.sh (the
# benchmark's cloud-init + waagent and no-agent variants), so every variant differs only in what it
# adds.  Sourced, not run.  Needs: SUITE, SOURCES set by the caller, image/trees.sh sourced.

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
    # In a private mount namespace: the /proc, /sys and /dev mmdebstrap mounts inside DEST are never
    # seen by the host (nothing else can walk into them or keep them busy) and go away with it, even
    # when it is killed; in a process group of its own, so a signal to the build stops it at once.
    run_killable unshare --mount --propagation private -- mmdebstrap --mode=root --variant=apt --format=directory \
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

# apt_install_deb ROOT DEB [APT_CACHE]: install the package file DEB into the finished root file
# system ROOT with ROOT's own apt, as an image build adds a local package: its dependencies come
# from ROOT's apt sources (the distribution's python3 and libraries) and its maintainer scripts run
# chrooted (bytecode, unit enablement, catalog trigger).  mmdebstrap removed ROOT's package lists,
# so apt-get update runs first; the lists and the downloaded .debs go again afterwards, so ROOT
# keeps only what the packages install.  APT_CACHE, when given, is bind-mounted as apt's archive
# directory (downloads kept for the next build).  The host's resolv.conf is bind-mounted over
# ROOT's for the downloads (a symlink or no file there is set aside for an empty file meanwhile);
# every mount is in a private mount namespace and goes away with it, so ROOT never holds the
# host's file.
apt_install_deb() {
    local root=$1 deb=$2 cache=${3:-} name rc=0 resolv=$1/etc/resolv.conf aside=
    name=$(basename "$deb")
    [ -f "$deb" ] || die "apt_install_deb: no such package: $deb"
    if [ -L "$resolv" ] || [ ! -e "$resolv" ]; then
        aside=$resolv.apt-install-deb
        rm -f -- "$aside"
        if [ -L "$resolv" ]; then mv -T -- "$resolv" "$aside"; fi
        : > "$resolv"
    fi
    [ -f "$resolv" ] || die "apt_install_deb: $resolv is not a regular file"
    mkdir -p "$root/tmp/apt-install-deb"
    cp -- "$deb" "$root/tmp/apt-install-deb/$name"
    # shellcheck disable=SC2016 # expanded by the inner shell
    unshare --mount --propagation private -- /bin/sh -c '
        set -e
        root=$1 cache=$2 name=$3
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        mount --bind -o ro /etc/resolv.conf "$root/etc/resolv.conf"
        [ -z "$cache" ] || mount --bind "$cache" "$root/var/cache/apt/archives"
        exec chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
            DEBIAN_FRONTEND=noninteractive /bin/sh -c "apt-get -q update &&
                apt-get -q install -y --no-install-recommends /tmp/apt-install-deb/$name"
    ' sh "$root" "$cache" "$name" || rc=$?
    # (With APT_CACHE mounted, the .debs went there; ROOT's own archive directory stays empty.)
    rm -rf -- "$root/tmp/apt-install-deb" "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin
    find "$root/var/lib/apt/lists" -maxdepth 1 -type f ! -name lock -delete
    if [ -n "$aside" ]; then
        rm -f -- "$resolv"
        if [ -L "$aside" ]; then mv -T -- "$aside" "$resolv"; fi
    fi
    [ "$rc" = 0 ] || die "apt_install_deb: apt-get install of $name into $root failed (exit $rc)"
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
    # pip's console script becomes agent_entry's (below), and every module gets its bytecode.
    in_root /bin/bash -c "$(declare -f agent_entry); agent_entry /opt/guest-agent"
    ln -sf /opt/guest-agent/bin/guest-agent "$ROOT/usr/local/bin/guest-agent"
    in_root /usr/local/bin/guest-agent --version >/dev/null
}

# agent_entry VENV: VENV/bin/guest-agent as `#!VENV/bin/python3 -I` (isolated: PYTHON* variables,
# the user's site and the script's own directory are ignored; `site` runs, so a .pth file or a
# package installed later is seen), then the bytecode of every module in VENV compiled at the level
# that line runs with (no -O), and checked: a module without it would be compiled on every boot,
# in memory only (the units' ProtectSystem=strict keeps /opt read-only).  Run where VENV lives (in
# the image: chrooted, with the image's interpreter); tests/test_image_entry.py runs it on a venv.
agent_entry() {
    local venv=$1 py=$1/bin/python3 tag missing
    printf '%s\n' "#!$py -I" 'import sys' 'from guest_agent.cli import main' 'sys.exit(main())' \
        > "$venv/bin/guest-agent.new" && chmod 0755 "$venv/bin/guest-agent.new" &&
        mv -f "$venv/bin/guest-agent.new" "$venv/bin/guest-agent" || return 1
    "$py" -I -m compileall -q -o 0 "$venv/lib" || { echo "agent_entry: compileall failed" >&2; return 1; }
    tag=$("$py" -I -c 'import sys; print(sys.implementation.cache_tag)') || return 1
    missing=$(find "$venv/lib" -name '*.py' ! -path '*/__pycache__/*' | while read -r f; do
        [ -f "${f%/*}/__pycache__/$(basename "$f" .py).$tag.pyc" ] || echo "$f"
    done)
    [ -z "$missing" ] || { echo "agent_entry: no bytecode for: $missing" >&2; return 1; }
}

# ---------------------------------------------------------------- the tuned image
# image/build.sh's product and the floor-tuned variant share these steps; the stock variants
# (floor-stock, cloudinit, caa-chain, caa, caa-sftp) boot the base as Debian configures it.  Each
# step, why a pod VM can do without what it removes, and what it measured: docs/image-tuning.md.
# TUNE_SKIP="step ..." leaves steps out (A/B builds only): initrd masks generators coldplug nokvm.
# Measured and dropped (no gain): `quiet` on the command line, Storage=volatile.

# The kernel command line every image boots with (written to <build dir>/cmdline).  fsck.mode=skip:
# the stock initrd would otherwise check the root file system of every fresh disk.
# systemd.show_status=1: unit status on the console (`quiet` instead measured no gain).
CMDLINE="root=/dev/vda rw console=ttyS0,115200 panic=-1 fsck.mode=skip systemd.show_status=1"
# Modules the tuned initrd loads (their dependencies come along): the root disk's driver, and the
# NIC's, so the NIC is there before udev starts and networkd gets it sooner (docs/image-tuning.md).
INITRD_MODULES=(virtio_pci virtio_blk virtio_net)

tune_on() { [[ " ${TUNE_SKIP:-} " != *" $1 "* ]]; }

# tune_rootfs: the tuned image's changes to $ROOT (units, generators).
tune_rootfs() {
    if tune_on masks; then
        # Units a pod VM does not need on its way to the lease (docs/image-tuning.md says why each).
        systemctl --root="$ROOT" mask \
            systemd-random-seed.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount \
            sys-kernel-debug.mount sys-kernel-tracing.mount dev-hugepages.mount sys-fs-fuse-connections.mount \
            modprobe@configfs.service modprobe@dm_mod.service modprobe@efi_pstore.service \
            modprobe@fuse.service modprobe@loop.service \
            systemd-remount-fs.service systemd-sysusers.service systemd-network-generator.service \
            systemd-update-utmp.service systemd-update-utmp-runlevel.service systemd-user-sessions.service \
            systemd-journal-flush.service systemd-pstore.service getty.target \
            apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer fstrim.timer >/dev/null 2>&1
        systemctl --root="$ROOT" set-default multi-user.target >/dev/null 2>&1
        # sysusers is masked: the users and groups its files declare are made now, at build time.
        systemd-sysusers --root="$ROOT" >/dev/null
        # kmod-static-nodes is masked: the kernel is fixed at build time, so is the list of device
        # nodes whose first open loads their module (/dev/fuse, /dev/net/tun, ...); written here in
        # the tmpfiles form `kmod static-nodes` writes to /run at boot (systemd-tmpfiles-setup-dev
        # creates the nodes, as before).
        local kver
        kver=$(ls "$ROOT/lib/modules" | sort -V | tail -n1)
        systemctl --root="$ROOT" mask kmod-static-nodes.service >/dev/null 2>&1
        awk '!/^#/ && NF == 3 {
                n = split($2, p, "/"); d = "/dev"
                for (i = 1; i < n; i++) { d = d "/" p[i]; print "d " d " 0755 - - -" }
                t = substr($3, 1, 1); mm = substr($3, 2)
                printf "%s! /dev/%s 0600 - - - %s\n", t, $2, mm
            }' "$ROOT/lib/modules/$kver/modules.devname" > "$ROOT/usr/lib/tmpfiles.d/static-nodes-podvm.conf"
        # /etc/modules-load.d holds only Debian's link to the commented-out /etc/modules: without it
        # systemd-modules-load's condition skips the unit (a module list added later still runs it).
        if ! grep -qv '^[[:space:]]*\(#\|$\)' "$ROOT/etc/modules"; then rm -f "$ROOT/etc/modules-load.d/modules.conf"; fi
    fi
    if tune_on coldplug; then
        # udev's coldplug replays an "add" event for every device the kernel made before udevd
        # started; udevd's workers run every rule over each.  Under TCG that was 3.5-7 s of CPU per
        # boot (systemd-udevd.service's CPUUsageNSec), on the two vCPUs the lease also needs.  Not
        # replayed here: classes whose devices a pod VM neither names nor needs a driver for
        # (consoles and ttys: no gettys, the console is the kernel's; input and hid; the memory
        # devices /dev/null & co., which devtmpfs makes with the right modes; kernel-internal
        # classes; /sys/module).  Kept: buses (pci, acpi, platform, virtio, vmbus: their modalias
        # loads the drivers), block, net, tpm, tpmrm, scsi, cpu.  Devices created later, by a
        # driver udev loads, still get their real events.  Debian's own --prioritized-subsystem
        # list (module,block,tpmrm,net,tty,input) shrinks to what is left of it, with net first:
        # the NIC's event (and its parents') then reaches udevd's workers before the disks', whose
        # rules probe them (blkid, ata_id, scsi_id), and systemd-networkd, which waits for udev to
        # have processed the link, gets it sooner (docs/image-tuning.md, step 6).
        mkdir -p "$ROOT/etc/systemd/system/systemd-udev-trigger.service.d"
        local nomatch="" sub
        for sub in module tty vc vtconsole input hid mem machinecheck workqueue event_source clockevents \
            clocksource msr cpuid graphics sound thermal bdi; do nomatch+=" --subsystem-nomatch=$sub"; done
        printf '%s\n' '# image/recipe.sh tune_rootfs: coldplug only what a pod VM needs (docs/image-tuning.md).' \
            '[Service]' 'ExecStart=' \
            "ExecStart=-udevadm trigger --type=all --action=add --prioritized-subsystem=net,block,tpmrm$nomatch" \
            > "$ROOT/etc/systemd/system/systemd-udev-trigger.service.d/10-podvm.conf"
    fi
    if tune_on nokvm; then
        # A peer-pod VM runs its containers itself, never a nested VM: the CPU's modalias
        # (x86cpu:...svm/vmx) would have udev load kvm (1.1 MB) and kvm_amd/kvm_intel in the
        # window before the lease.
        mkdir -p "$ROOT/etc/modprobe.d"
        printf '%s\n' '# image/recipe.sh tune_rootfs: a pod VM runs no nested VMs (docs/image-tuning.md).' \
            'blacklist kvm' 'blacklist kvm_amd' 'blacklist kvm_intel' > "$ROOT/etc/modprobe.d/podvm-nokvm.conf"
    fi
    if tune_on generators; then
        # Generators for things a pod VM has none of (SysV scripts, GPT auto-mounts, crypttab,
        # veritytab, integritytab, hibernation, boot counting, offline updates, gettys, rc.local).
        # Kept: fstab (the root mount), debug (systemd.wants= / systemd.mask= on the command line),
        # run (systemd.run=).
        mkdir -p "$ROOT/etc/systemd/system-generators"
        local g
        for g in sysv gpt-auto cryptsetup veritysetup integritysetup hibernate-resume bless-boot \
            system-update getty rc-local; do
            ln -sfn /dev/null "$ROOT/etc/systemd/system-generators/systemd-$g-generator"
        done
    fi
}

# tune_initrd OUT: the tuned image's initramfs at OUT (image/initrd/init.c + INITRD_MODULES), or a
# copy of the stock initramfs-tools one with TUNE_SKIP=initrd.  Needs $ROOT (its kernel modules).
tune_initrd() {
    local out=$1 kver bin
    kver=$(ls "$ROOT/lib/modules" | sort -V | tail -n1)
    if ! tune_on initrd; then
        install -m 0644 "$ROOT/boot/initrd.img-$kver" "$out"
        return
    fi
    bin=$(mktemp)
    gcc -static -Os -s -Wall -Wextra -Werror -o "$bin" "$RECIPE_DIR/initrd/init.c"
    python3 "$RECIPE_DIR/initrd/mkinitrd.py" "$ROOT" "$kver" "$bin" "$out" "${INITRD_MODULES[@]}" >/dev/null
    rm -f "$bin"
}
