#!/usr/bin/env bash
# Run by packaging/readme-check.sh as mmdebstrap's customize hook, on the host:
# readme-check.steps.sh ROUTE ROOT [CA_BUNDLE].  Runs the README's commands of ROUTE
# (tests/readme_install.py) line by line, as written, each printed as "[readme] <where>$ <line>":
#   host: in this repository with ROOTFS=ROOT, without the calling make's variables;
#   root: chrooted in ROOT, in a clean environment, stdin closed (a prompt fails as in a script).
# A place "in a copy of this repository" gets git's files of the working tree copied there first.
# CA_BUNDLE: while a root line runs, once the root has its own /etc/ssl/certs/ca-certificates.crt
# (Debian's pip trusts that file only), a copy of the host's is bind-mounted read-only over it, so
# pip trusts what the host trusts on a network that inspects TLS; the root still needs the file.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
route=$1 root=$2 ca=${3:-}

die() { printf '[readme] FAIL: %s\n' "$*"; exit 1; }
# shellcheck source=../image/trees.sh
. "$REPO/image/trees.sh"

in_root() {
    local cwd=$1 cmd=$2 target=$root/etc/ssl/certs/ca-certificates.crt bound= rc=0
    if [ -n "$ca" ] && [ -f "$ca" ] && [ -f "$target" ] && [ ! -L "$target" ]; then
        mount --bind -o ro -- "$ca" "$target"
        bound=1
    fi
    chroot "$root" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LC_ALL=C.UTF-8 /bin/sh -ec "cd \"\$0\" && $cmd" "$cwd" </dev/null || rc=$?
    [ -z "$bound" ] || umount -- "$target"
    return "$rc"
}

steps=$(cd "$REPO" && python3 -m tests.readme_install "$route")
while IFS=$'\t' read -r where setup cwd cmd; do
    case $setup in
        repo) copy_worktree "$REPO" "$root$cwd" ;;
        -) ;;
        *) die "unknown setup $setup" ;;
    esac
    printf '[readme] %s$ %s\n' "$where" "$cmd"
    rc=0
    case $where in
        host) (cd "$REPO" && env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL ROOTFS="$root" /bin/sh -ec "$cmd") </dev/null || rc=$? ;;
        root) in_root "$cwd" "$cmd" || rc=$? ;;
        *) die "unknown place $where" ;;
    esac
    [ "$rc" = 0 ] || die "exit $rc: $cmd"
done <<<"$steps"
