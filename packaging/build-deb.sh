#!/usr/bin/env bash
# `make deb`: the Debian package of the agent (debian/), built by dpkg-buildpackage from a clean copy
# of the working tree (git's tracked and untracked files, not its ignored ones), then checked by
# lintian.  Writes out/deb/guest-agent_<version>_all.deb (and its .buildinfo, .changes and
# lintian.txt) and prints the .deb's path on the last line.  Needs .ci/apt-deps deb; not root.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=${DEB_OUT:-$REPO/out/deb}

die() { printf '[deb] error: %s\n' "$*" >&2; exit 1; }
log() { printf '[deb] %s\n' "$*" >&2; }
# shellcheck source=../image/trees.sh
. "$REPO/image/trees.sh"

for t in dpkg-buildpackage dpkg-parsechangelog lintian tar; do
    command -v "$t" >/dev/null || die "missing $t (.ci/apt-deps deb installs the tools)"
done

# debian/changelog names the version the package gets; it must be the agent's own.
version=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$REPO/guest_agent/__init__.py")
debver=$(dpkg-parsechangelog -l "$REPO/debian/changelog" -S Version)
[ "${debver%%-*}" = "$version" ] ||
    die "debian/changelog says $debver, guest_agent/__init__.py $version: add a changelog entry (dch -v $version)"

mkdir -p "$OUT"
work=$OUT/build
remove_tree "$work"
guard_tree "$work"
src=$work/guest-agent-$version
# The copy: files git knows, so nothing ignored (venv, image trees, caches) comes along.
copy_worktree "$REPO" "$src"

log "dpkg-buildpackage in $src"
# The distribution's interpreter and tools only: a python3 earlier on PATH (pyenv, a venv) is not
# the one the package depends on and lacks Debian's build modules.  Nor the variables of a `make`
# this runs under: `make deb PREFIX=...` must not reach debian/rules' `make install`.
(cd "$src" && env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage --build=binary --no-sign) >"$work/build.log" 2>&1 ||
    { tail -n 40 "$work/build.log" >&2; die "dpkg-buildpackage failed (log: $work/build.log)"; }

changes=$(find "$work" -maxdepth 1 -name "guest-agent_${debver}_*.changes" | head -n1)
[ -n "$changes" ] || die "no .changes file in $work"
rm -f "$OUT"/guest-agent_*.deb "$OUT"/guest-agent_*.buildinfo "$OUT"/guest-agent_*.changes
for f in "$work"/guest-agent_"$debver"_*.{deb,buildinfo,changes}; do mv -- "$f" "$OUT/"; done
cp "$work/build.log" "$OUT/build.log"
remove_tree "$work"

# Errors and warnings fail the build; info and pedantic tags are shown.  Overrides, each explained:
# debian/guest-agent.lintian-overrides.
log "lintian"
rc=0
lintian --info --pedantic --display-experimental --fail-on error,warning \
    "$OUT/$(basename "$changes")" >"$OUT/lintian.txt" 2>&1 || rc=$?
cat "$OUT/lintian.txt" >&2
[ "$rc" = 0 ] || die "lintian found errors or warnings (above; $OUT/lintian.txt)"
deb=$(find "$OUT" -maxdepth 1 -name "guest-agent_${debver}_all.deb")
log "built $(du -k "$deb" | cut -f1) KiB"
echo "$deb"
