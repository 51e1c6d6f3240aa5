#!/bin/sh
# Run chrooted by packaging/deb-check.sh in a fresh Debian chroot with /tmp holding the package and
# a sample user-data: each step is printed as "[inside] ..." and any failure ends the check.
set -eu
export DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8
say() { printf '[inside] %s\n' "$*"; }
fail() { say "FAIL: $*"; exit 1; }
cd /tmp

say "$(. /etc/os-release && echo "$PRETTY_NAME"), $(python3 --version 2>/dev/null || echo 'no python3 yet')"
apt-get install -y --no-install-recommends ./guest-agent_*_all.deb
say "installed: $(dpkg-query -W -f '${Package} ${Version}, ' guest-agent python3 python3-yaml python3-h11 python3-pyroute2 systemd)"

say "--version: $(guest-agent --version)"
exec_start=$(sed -n 's/^ExecStart=//p' /usr/lib/systemd/system/guest-agent.service)
[ "$exec_start" = "/usr/bin/guest-agent run" ] || fail "ExecStart=$exec_start"
say "ExecStart=$exec_start"

out=$(guest-agent check /tmp/user-data) || fail "guest-agent check exited $?: $out"
say "check: $(printf '%s\n' "$out" | grep -c .) lines, $(printf '%s\n' "$out" | grep -c '/run/peerpod/') under /run/peerpod"

for u in guest-agent.service guest-agent-imds-nat.service; do
    state=$(systemctl --root / is-enabled "$u" || true)
    [ "$state" = enabled ] || fail "$u is $state"
    say "is-enabled $u: $state"
done
# What a preset-applying image build (mkosi, `systemctl preset`) decides: the shipped preset enables both.
systemctl --root / preset --preset-mode=enable-only guest-agent.service guest-agent-imds-nat.service
say "preset: $(systemctl --root / is-enabled guest-agent.service)"

# systemd's dpkg trigger on /usr/lib/systemd/catalog compiled the catalog at install time.
ids=$(sed -n 's/^-- \([0-9a-f]\{32\}\)$/\1/p' /usr/lib/systemd/catalog/guest-agent.catalog)
for id in $ids; do
    journalctl --list-catalog "$id" | grep -q . || fail "catalog entry $id not compiled by the trigger"
done
journalctl --update-catalog
say "catalog: all $(echo "$ids" | wc -l) guest-agent entries compiled by systemd's trigger, --update-catalog ok"

say "man: $(man -w guest-agent)"
[ ! -d /run/systemd/system ] || fail "a running systemd in the chroot"
say "nothing started: $(ls /run/peerpod 2>/dev/null | wc -l) files in /run/peerpod"

apt-get purge -y guest-agent
links=$(find /etc/systemd/system -name 'guest-agent*' | wc -l)
[ "$links" = 0 ] || fail "$links unit links left after purge"
say "purged: no guest-agent unit links left"
