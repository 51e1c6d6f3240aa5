#!/bin/sh
# Run chrooted by packaging/readme-check.sh in a fresh Debian root after the README's commands of
# ROUTE (deb or venv) installed the agent there: readme-check.inside.sh ROUTE, with /tmp/check
# holding a sample user-data.  Each step is printed as "[inside] ..." and any failure ends the check.
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
route=$1
say() { printf '[inside] %s\n' "$*"; }
fail() { say "FAIL: $*"; exit 1; }
cd /tmp/check

say "$(. /etc/os-release && echo "$PRETTY_NAME"), $(systemctl --version | head -n1 | cut -d' ' -f1,2), $route route"

# The unit, wherever the route put it, and the program its ExecStart names.
unit=
for d in /etc/systemd/system /usr/local/lib/systemd/system /usr/lib/systemd/system; do
    [ -f "$d/guest-agent.service" ] && { unit=$d/guest-agent.service; break; }
done
[ -n "$unit" ] || fail "no guest-agent.service installed"
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
exe=${exec_start%% *}
[ -x "$exe" ] || fail "ExecStart=$exec_start: $exe is not an executable"
[ "$route" != deb ] || [ "$exec_start" = "/usr/bin/guest-agent run" ] || fail "ExecStart=$exec_start"
say "$unit: ExecStart=$exec_start"

# The interpreter the script runs on (its #! line) and the libraries it imports there.
# (An assignment fails with its command under set -e; a failing $(...) inside say's arguments would not.)
python=$(sed -n '1s/^#! *\([^ ]*\).*/\1/p' "$exe")
# The package's script starts Python isolated, as the image's venv script does (debian/rules).
[ "$route" != deb ] || head -n1 "$exe" | grep -q -- ' -I$' || fail "$exe: $(head -n1 "$exe") lacks -I"
versions=$("$python" -c 'import importlib.metadata as m, platform, sys
libs = ", ".join(f"{d} {m.version(d)}" for d in ("guest-agent", "PyYAML", "h11", "pyroute2"))
print(f"Python {platform.python_version()} ({sys.executable}): {libs}")')
say "$versions"
if [ "$route" = deb ]; then depends=$(dpkg-query -W -f '${Depends}' guest-agent); say "Depends: $depends"; fi
version=$("$exe" --version)
say "--version: $version"
# The README's debugging commands call the agent by name.
on_path=$(command -v guest-agent) || fail "guest-agent is not on PATH ($PATH)"
say "on PATH: $on_path"

out=$("$exe" check /tmp/check/user-data) || fail "guest-agent check exited $?: $out"
say "check: $(printf '%s\n' "$out" | grep -c .) lines, $(printf '%s\n' "$out" | grep -c '/run/peerpod/') under /run/peerpod"

for u in guest-agent.service guest-agent-imds-nat.service; do
    state=$(systemctl --root / is-enabled "$u" || true)
    [ "$state" = enabled ] || fail "$u is $state"
    say "is-enabled $u: $state"
done
# What a preset-applying image build (mkosi, `systemctl preset`) decides: the shipped preset enables both.
systemctl --root / preset --preset-mode=enable-only guest-agent.service guest-agent-imds-nat.service
state=$(systemctl --root / is-enabled guest-agent.service)
say "preset: $state"

# The units load, their programs exist and their man pages are there (netns@.service runs `ip`);
# the IMDS NAT loads its rule with `nft`.
systemd-analyze verify guest-agent.service guest-agent-imds-nat.service netns@podns.service ||
    fail "systemd-analyze verify (above)"
command -v nft >/dev/null || fail "no nft for the IMDS NAT"
say "systemd-analyze verify: guest-agent, guest-agent-imds-nat, netns@podns ok; nft: $(command -v nft)"

# The journal catalog: compiled by systemd's dpkg trigger (deb) or the README's --update-catalog.
ids=$(sed -n 's/^-- \([0-9a-f]\{32\}\)$/\1/p' /usr/lib/systemd/catalog/guest-agent.catalog)
for id in $ids; do
    journalctl --list-catalog "$id" | grep -q . || fail "catalog entry $id not compiled"
done
say "catalog: all $(echo "$ids" | wc -l) guest-agent entries compiled"

page=$(man -w guest-agent)
say "man: $page"
[ ! -d /run/systemd/system ] || fail "a running systemd in the root"
say "nothing started: $(ls /run/peerpod 2>/dev/null | wc -l) files in /run/peerpod"

if [ "$route" = deb ]; then
    apt-get purge -y guest-agent
    links=$(find /etc/systemd/system -name 'guest-agent*' | wc -l)
    [ "$links" = 0 ] || fail "$links unit links left after purge"
    say "purged: no guest-agent unit links left"
fi
