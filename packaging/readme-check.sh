#!/usr/bin/env bash
# `make readme-check`: the README's install commands ("Putting guest-agent into a pod VM image"),
# as written, in fresh Debian roots, then the result used there, as an image build would
# (packaging/readme-check.sh [--route deb|venv]... [RELEASE...]; default both routes on bookworm and
# trixie; root).  `make deb-check` is the deb route alone.
#
# Per release and route: mmdebstrap --variant=apt with systemd and man-db (what any pod VM image
# has), then, as its customize hooks: the route's commands read from README.md's code block
# (tests/readme_install.py) and run by packaging/readme-check.steps.sh on the build host (in this
# repository, ROOTFS set) or chrooted in the root, line by line as written; then, chrooted,
# packaging/readme-check.inside.sh: --version, `guest-agent check` of a CAA-shaped user-data, the
# units enabled, their ExecStart executable, `systemd-analyze verify`, the journal catalog, the man
# page, and for the package `apt-get purge` leaving no unit link.  The mirror is the host's (apt's
# index targets); the root lives under out/readme-check/ while it runs, mmdebstrap's mounts are in a
# private mount namespace, and the tree is removed on every exit.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${README_CHECK_WORK:-$REPO/out/readme-check}

die() { printf '[readme-check] error: %s\n' "$*" >&2; exit 1; }
log() { printf '[readme-check] %s\n' "$*" >&2; }
# shellcheck source=../image/trees.sh
. "$REPO/image/trees.sh"

ROUTES=()
while [ $# -gt 0 ]; do
    case $1 in
        --route) [ $# -ge 2 ] || die "--route needs deb or venv"; ROUTES+=("$2"); shift 2 ;;
        *) break ;;
    esac
done
[ ${#ROUTES[@]} -gt 0 ] || ROUTES=(deb venv)
RELEASES=("$@")
[ ${#RELEASES[@]} -gt 0 ] || RELEASES=(bookworm trixie)

[ "$(id -u)" = 0 ] || die "needs root (mmdebstrap --mode=root, chroot)"
for t in mmdebstrap unshare apt-get python3 git make systemctl journalctl; do
    command -v "$t" >/dev/null || die "missing tool: $t (.ci/apt-deps deb)"
done
# The README's blocks parse before anything is built.
for route in "${ROUTES[@]}"; do (cd "$REPO" && python3 -m tests.readme_install "$route" >/dev/null) || exit 1; done

# The host's Debian mirror: the URI apt fetches its main suite from (no host name is written here).
MIRROR=$(host_mirror)

# What the checks bring into the root (/tmp/check): a sample user-data as CAA renders it
# (tests/e2e/userdata.py) and the checks; and the host's CA bundle for the steps (readme-check.steps.sh).
mkdir -p "$WORK"
in=$WORK/in
remove_tree "$in"
guard_tree "$in"
mkdir -p "$in"
(cd "$REPO" && python3 -c 'import sys; from tests.e2e.userdata import valid; sys.stdout.buffer.write(valid()[0])') \
    >"$in/user-data"
cp "$REPO/packaging/readme-check.inside.sh" "$in/inside.sh"
cp /etc/ssl/certs/ca-certificates.crt "$in/host-ca.crt" 2>/dev/null || true
on_exit "rm -rf --one-file-system '$in'"

failed=()
for rel in "${RELEASES[@]}"; do
    for route in "${ROUTES[@]}"; do
        root=$WORK/$rel-$route
        remove_tree "$root"
        guard_tree "$root"
        t=$SECONDS
        log "$rel, $route route: mmdebstrap --variant=apt from $MIRROR, the README's commands, the checks (log: $root.log)"
        rc=0
        # In a private mount namespace: mmdebstrap's /proc, /sys and /dev mounts in the root (and
        # the steps' CA bind mount) go away with it, even when it is killed.
        run_killable unshare --mount --propagation private -- mmdebstrap --mode=root --variant=apt \
            --format=directory --include=systemd,man-db \
            --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
            --customize-hook="mkdir \"\$1/tmp/check\"" \
            --customize-hook="copy-in $(printf '%q ' "$in/user-data" "$in/inside.sh") /tmp/check" \
            --customize-hook="$(printf '%q ' "$REPO/packaging/readme-check.steps.sh" "$route") \"\$1\" $(printf '%q' "$in/host-ca.crt")" \
            --customize-hook="chroot \"\$1\" /bin/sh /tmp/check/inside.sh $route" \
            --customize-hook='rm -rf "$1/tmp/check"' \
            "$rel" "$root" "deb $MIRROR $rel main" >"$root.log" 2>&1 || rc=$?
        grep -E '^\[(readme|inside)\]' "$root.log" >&2 || true
        remove_tree "$root"
        if [ "$rc" = 0 ]; then
            log "$rel, $route route: ok ($((SECONDS - t)) s)"
        else
            grep -vE '^\[(readme|inside)\]' "$root.log" | tail -n 15 >&2
            log "$rel, $route route: FAILED (exit $rc, $((SECONDS - t)) s; $root.log)"
            failed+=("$rel/$route")
        fi
    done
done
[ ${#failed[@]} = 0 ] || die "failed: ${failed[*]}"
log "all passed: ${RELEASES[*]} x ${ROUTES[*]} in $SECONDS s"
