# Build trees that cannot harm the machine: sourced by image/build.sh and
# image/variants/build-variant.sh (docs/building.md).  A root file system under construction has
# /proc, /dev and the like mounted inside it at times; a copy or removal that follows a mount point
# reads or deletes the host instead (a live /proc copied by `cp -a` fills any disk).  So:
#   - every copy of a tree refuses a source with a mount point inside and stays on one file system;
#   - every removal unmounts first (never lazily) and stays on one file system;
#   - the guarded trees are unmounted on every exit path (EXIT, INT, TERM, HUP), and a failed build
#     removes them;
#   - long steps run in a process group of their own, so a signal to the script stops them at once.
# Needs: die (the caller's error function: prints, exits non-zero).

# mounts_under DIR: every mount point at or below DIR, deepest first (/proc/self/mountinfo's fifth
# field, octal escapes decoded).
mounts_under() {
    local dir
    dir=$(realpath -m -- "$1")
    awk -v d="$dir" '
        function unescape(s,   out, i) {
            out = ""
            while ((i = index(s, "\\")) > 0) {
                out = out substr(s, 1, i - 1) sprintf("%c", substr(s, i + 1, 1) * 64 + substr(s, i + 2, 1) * 8 + substr(s, i + 3, 1))
                s = substr(s, i + 4)
            }
            return out s
        }
        { p = unescape($5); if (p == d || index(p, d "/") == 1) print p }
    ' /proc/self/mountinfo | LC_ALL=C sort -r -u
}

# refuse_mounts DIR: fail, naming them, if anything is mounted at or below DIR.
refuse_mounts() {
    local m
    m=$(mounts_under "$1")
    [ -z "$m" ] || die "refusing to use $1: mount point(s) inside it: $(tr '\n' ' ' <<<"$m")(unmount them first)"
}

# unmount_under DIR: unmount everything at or below DIR, deepest first.  A busy mount (a process
# has a file open or its working directory inside) is retried for TREES_UMOUNT_S seconds, then this
# fails: a lazy unmount would only hide the mount from this namespace while the tree stays in use.
TREES_UMOUNT_S=${TREES_UMOUNT_S:-10}
unmount_under() {
    local dir=$1 m left deadline=$((SECONDS + TREES_UMOUNT_S))
    while :; do
        left=$(mounts_under "$dir")
        [ -n "$left" ] || return 0
        if [ "$SECONDS" -ge "$deadline" ]; then
            printf 'error: still mounted after %s s of retries: %s(busy: fuser -vm <mount point>)\n' \
                "$TREES_UMOUNT_S" "$(tr '\n' ' ' <<<"$left")" >&2
            return 1
        fi
        while read -r m; do umount -- "$m" 2>/dev/null || true; done <<<"$left"
        [ -z "$(mounts_under "$dir")" ] || sleep 0.2
    done
}

# copy_tree SRC DST: cp -a of SRC to a new DST that never leaves SRC's file system, after refusing
# a SRC with a mount point inside (cp -x would copy an empty directory for it, hiding the problem).
copy_tree() {
    refuse_mounts "$1"
    [ ! -e "$2" ] || die "copy_tree: $2 exists"
    cp -ax -- "$1" "$2"
}

# copy_worktree REPO DST: the repository's files that git knows (tracked, and untracked but not
# ignored), listed one by one, into DST: no venv, image tree or cache, nothing under a mount point.
copy_worktree() {
    mkdir -p -- "$2"
    (cd "$1" && git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done |
        tar --null --no-recursion --one-file-system -T - -cf -) | tar -xf - -C "$2"
}

# remove_tree DIR...: unmount whatever is mounted inside, then rm -rf on DIR's file system only.
remove_tree() {
    local d
    for d in "$@"; do
        [ -e "$d" ] || continue
        unmount_under "$d" || die "cannot remove $d: something stays mounted inside it"
        rm -rf --one-file-system -- "$d"
    done
}

# ---------------------------------------------------------------- exit paths
TREES_GUARDED=()  # trees unmounted on every exit, removed when the script fails
TREES_CLEANUP=()  # commands run on every exit (temporary files)
TREES_CHILD=      # the process group of the running run_killable command

# guard_tree DIR...: unmount DIR on every exit path; remove it if the script exits non-zero.
guard_tree() { TREES_GUARDED+=("$@"); }
# on_exit CMD: run CMD (a shell string) on every exit path.
on_exit() { TREES_CLEANUP+=("$1"); }

# run_killable CMD...: CMD in a process group of its own, waited for with `wait` (bash runs a trap
# only once the foreground command is over, while `wait` returns at once), so a signal to this script
# reaches its trap, which then stops the whole group.
run_killable() {
    setsid "$@" <&0 &
    TREES_CHILD=$!
    local rc=0
    wait "$TREES_CHILD" || rc=$?
    TREES_CHILD=
    return "$rc"
}

# trees_alive PID: PID runs (a zombie, exited but not yet waited for, does not).
trees_alive() {
    local s
    s=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${s#Z}" = "$s" ]
}

# The running command's group: TERM, up to 10 s to finish (mmdebstrap unmounts on TERM), then KILL.
trees_stop_child() {
    local pid=$TREES_CHILD i
    [ -n "$pid" ] || return 0
    kill -TERM -- "-$pid" 2>/dev/null || true
    for i in $(seq 50); do trees_alive "$pid" || break; sleep 0.2; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    TREES_CHILD=
}

trees_exit() {
    local rc=$? c d
    trap - EXIT INT TERM HUP
    trees_stop_child
    for c in "${TREES_CLEANUP[@]}"; do eval "$c" || true; done
    for d in "${TREES_GUARDED[@]}"; do
        [ -e "$d" ] || continue
        if ! unmount_under "$d"; then
            printf 'error: %s is left with a mount inside (above); not removed\n' "$d" >&2
            [ "$rc" != 0 ] || rc=1
        elif [ "$rc" != 0 ]; then
            rm -rf --one-file-system -- "$d"
        fi
    done
    exit "$rc"
}
trap trees_exit EXIT
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- the apt cache
# prune_apt_cache DIR PACKAGES: keep in DIR only the .debs of the name/version pairs PACKAGES lists
# (dpkg-query's "name version" lines): mmdebstrap's sync-out adds every download to the cache, so
# without this each package update leaves the old version behind.
prune_apt_cache() {
    local dir=$1 list=$2 f
    find "$dir" -maxdepth 1 -name '*.deb' -printf '%f\n' | awk -v list="$list" '
        BEGIN { while ((getline l < list) > 0) { split(l, a, " "); v = a[2]; gsub(":", "%3a", v); keep[a[1] "_" v] = 1 } }
        { n = split($0, p, "_"); if (!((p[1] "_" p[2]) in keep)) print }
    ' | while read -r f; do rm -f -- "$dir/$f"; done
}

# build_base BASE APT_CACHE [EXTRA_PACKAGE...]: image/recipe.sh's mmdebstrap_base into BASE.tmp
# (removed if the script fails), marked .complete and moved to BASE only with nothing mounted inside
# (mmdebstrap's own mounts live in a private mount namespace; anything else is unmounted or the build
# fails here); APT_CACHE keeps the .debs of the base's versions only.
build_base() {
    local base=$1 apt_cache=$2
    shift 2
    guard_tree "$base.tmp"
    mmdebstrap_base "$base.tmp" "$apt_cache" "$@"
    unmount_under "$base.tmp" || die "base: $base.tmp keeps a mount inside; not marked complete"
    prune_apt_cache "$apt_cache" "$base.tmp/.packages"
    touch "$base.tmp/.complete"
    mv "$base.tmp" "$base"
}

# newest_deb REPO: the newest package `make deb` wrote (REPO/out/deb/guest-agent_*_all.deb);
# prints nothing, and succeeds, when there is none.
newest_deb() { { ls -t "$1"/out/deb/guest-agent_*_all.deb 2>/dev/null || true; } | head -n1; }

# host_suites: "URI SUITE" for each package index the host's apt fetches.
host_suites() { apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Created-By: Packages'; }
# host_mirror: the URI the host's apt fetches its main Debian suite from (not -security, -updates or
# -backports), so no host name is written in the scripts; fails (via die) when apt names none.
host_mirror() {
    local uri
    uri=$(host_suites | awk '$2 !~ /-(security|updates|backports)$/ { print $1; exit }')
    [ -n "$uri" ] || die "no Debian mirror in the host's apt configuration"
    echo "$uri"
}
