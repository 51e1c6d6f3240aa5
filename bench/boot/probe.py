"""In-guest start-up probe: what a Python process and each import cost inside the pod VM under TCG.

    python -m bench.boot.probe [--image DIR ...] [--runs 5] [--cases NAME,...]   (`make bench-imports`)

`make bench` counts the agent's CPU natively; this asks the question the boot benchmark raises: what
does the same process cost in the emulated guest, where the agent is the first Python process of the
boot?  For each image (default: image/build, the product), it copies the disk, writes a probe unit
and a small static runner into the copy (debugfs, no mount), boots it under QEMU TCG as the boot
benchmark does (`-m 1024 -smp 2`, the image's own kernel command line, the agent disabled with
`guest-agent=disabled`) and, once multi-user.target is reached and the guest is quiet, runs every
case `--runs` times in interleaved rounds:

- *warm*: page cache and QEMU's translated code already hold the interpreter (a later process);
- *cold*: `sync; echo 3 > /proc/sys/vm/drop_caches` before each run, so the interpreter and the
  modules are read again into new pages, which QEMU must translate again (what the first Python
  process of a boot pays; approximately: at boot the disk is also still cold in the host's cache).

The runner forks and execs the case and reports wall time and the child's `getrusage` (user, system,
minor and major faults).  Printed: medians per case, and each case minus `pass` (the interpreter).

Network safety: the guest has no network device at all (`-nic none`) and QEMU runs in a private
network namespace with only `lo`; every boot holds /tmp/guest-agent-qemu.lock like the other boots.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCK = "/tmp/guest-agent-qemu.lock"

# The agent's own imports up to `warm` (guest_agent.boot.run before the route wait, Azure), with the
# venv's interpreter and flags as /usr/local/bin/guest-agent starts them (image/recipe.sh agent_entry).
AGENT_WARM = (
    "from guest_agent.cli import main; "
    "from guest_agent import boot, clouds, initdata, userdata; from guest_agent.azure import fabric; "
    "clouds.provider_module('azure'); from guest_agent import tpm, network"
)

PY = "/usr/bin/python3 -I -c"
CASES: dict[str, str] = {
    "true": "/bin/true",
    "pass": f"{PY} pass",
    "typing": f"{PY} 'import typing'",
    "dataclasses": f"{PY} 'import dataclasses'",
    "dataclasses+10": f"{PY} 'import dataclasses as d\nfor i in range(10): d.dataclass(frozen=True)"
    '(type("C%d" % i, (), {"__annotations__": dict.fromkeys("abcde", "int"), **dict.fromkeys("abcde", 0)}))\'',
    "namedtuple+10": f'{PY} \'import collections as c\nfor i in range(10): c.namedtuple("N%d" % i, "a b c d e")\'',
    "re": f"{PY} 'import re'",
    "enum": f"{PY} 'import enum'",
    "json": f"{PY} 'import json'",
    "tomllib": f"{PY} 'import tomllib'",
    "base64": f"{PY} 'import base64'",
    "contextlib": f"{PY} 'import contextlib'",
    "datetime": f"{PY} 'import datetime'",
    "socket": f"{PY} 'import socket'",
    "logging": f"{PY} 'import logging'",
    "h11": "/opt/guest-agent/bin/python3 -I -c 'import h11'",
    "yaml": "/opt/guest-agent/bin/python3 -I -c 'import yaml'",
    "agent warm": '/opt/guest-agent/bin/python3 -I -c "$AGENT"',
}

RUNNER_C = r"""
#include <stdio.h>
#include <unistd.h>
#include <time.h>
#include <sys/wait.h>
#include <sys/resource.h>
int main(int argc, char **argv) {
    struct timespec a, b; struct rusage ru; int st;
    if (argc < 2) return 2;
    clock_gettime(CLOCK_MONOTONIC, &a);
    pid_t p = fork();
    if (p == 0) { execv(argv[1], argv + 1); _exit(127); }
    if (p < 0 || wait4(p, &st, 0, &ru) < 0) return 1;
    clock_gettime(CLOCK_MONOTONIC, &b);
    printf("%.4f %.4f %.4f %ld %ld %d", (b.tv_sec - a.tv_sec) + (b.tv_nsec - a.tv_nsec) / 1e9,
           ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6, ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6,
           ru.ru_minflt, ru.ru_majflt, WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    return 0;
}
"""

PROBE_SH = r"""#!/bin/bash
exec >/dev/ttyS0 2>&1
. /usr/local/lib/probe-cases.sh
echo "PROBE-BEGIN"
for mode in warm cold; do
  for ((r = 0; r < RUNS; r++)); do
    for c in "${CASES[@]}"; do
      [ "$mode" = cold ] && { sync; echo 3 > /proc/sys/vm/drop_caches; }
      echo "PROBE $mode $c $(eval "/usr/local/bin/probe-runner ${ARGS[$c]}")"
    done
  done
done
echo PROBE-END
systemctl poweroff -f
"""

UNIT = """[Unit]
Description=start-up cost probe (bench/boot/probe.py)
After=multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/local/bin/probe.sh
"""


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def cases_sh(names: list[str], runs: int) -> str:
    keys = {n: f"c{i}" for i, n in enumerate(names)}
    lines = ["declare -A ARGS", f"RUNS={runs}", f"AGENT={_sh_quote(AGENT_WARM)}"]
    lines.append("CASES=(" + " ".join(keys[n] for n in names) + ")")
    lines += [f"ARGS[{keys[n]}]={_sh_quote(CASES[n])}" for n in names]
    return "\n".join(lines) + "\n"


Runs = dict[str, dict[str, list[tuple[float, ...]]]]  # {mode: {case: [(wall, user, sys, minflt, majflt, rc)]}}


def boot(image: Path, names: list[str], runs: int, work: Path, timeout_s: float) -> Runs:
    """Boot one probe VM and return its runs."""
    wd = Path(tempfile.mkdtemp(prefix="probe-", dir=work))
    runner = wd / "probe-runner"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(runner), "-x", "c", "-"], input=RUNNER_C.encode(), check=True)
    (wd / "probe.sh").write_text(PROBE_SH)
    (wd / "probe.sh").chmod(0o755)
    (wd / "probe-cases.sh").write_text(cases_sh(names, runs))
    (wd / "probe.service").write_text(UNIT)
    disk = wd / "disk.raw"
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", str(image / "disk.raw"), str(disk)], check=True)
    cmds = "\n".join([
        "cd /usr/local/bin", f"write {runner} probe-runner", f"write {wd / 'probe.sh'} probe.sh",
        "cd /usr/local/lib", f"write {wd / 'probe-cases.sh'} probe-cases.sh",
        "cd /etc/systemd/system", f"write {wd / 'probe.service'} probe.service",
    ])  # fmt: skip
    subprocess.run(["debugfs", "-w", "-f", "-", str(disk)], input=cmds.encode(), check=True, capture_output=True)
    cmdline = (image / "cmdline").read_text().strip() + " systemd.wants=probe.service guest-agent=disabled"
    console = wd / "console.log"
    argv = [
        "qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "2", "-cpu", "qemu64,-hypervisor",
        "-nodefaults", "-display", "none", "-no-reboot", "-kernel", str(image / "vmlinuz"),
        "-initrd", str(image / "initrd.img"), "-append", cmdline,
        "-drive", f"file={disk},if=virtio,format=raw", "-nic", "none", "-serial", f"file:{console}",
    ]  # fmt: skip
    with open(LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        t0 = time.monotonic()
        subprocess.run(argv, check=True, timeout=timeout_s)
        took = time.monotonic() - t0
    out: Runs = {"warm": {}, "cold": {}}
    keys = {f"c{i}": n for i, n in enumerate(names)}
    text = console.read_text(errors="replace")
    if "PROBE-END" not in text:
        raise SystemExit(f"probe: no PROBE-END on the console after {took:.0f} s (see {console})")
    for m in re.finditer(r"^PROBE (warm|cold) (c\d+) ([\d.]+) ([\d.]+) ([\d.]+) (\d+) (\d+) (-?\d+)", text, re.M):
        vals = tuple(float(x) for x in m.groups()[2:])
        out[m.group(1)].setdefault(keys[m.group(2)], []).append(vals)
    print(f"  booted {image}: {took:.0f} s", flush=True)
    shutil.rmtree(wd)
    return out


def table(results: dict[str, Runs], names: list[str]) -> str:
    """Medians of wall and CPU (user + system), and wall minus `pass`, per image and mode."""
    rows = []
    for label, res in results.items():
        for mode in ("warm", "cold"):
            rows.append(f"\n{label}, {mode} (median of each case's runs; s; - pass: wall minus the `pass` row)")
            rows.append(f"  {'case':16} {'wall':>7} {'CPU':>7} {'user':>7} {'sys':>7} {'faults':>7} {'- pass':>7}")
            base = statistics.median(r[0] for r in res[mode].get("pass", [(0.0,)]))
            for n in names:
                runs = res[mode].get(n)
                if not runs:
                    continue
                bad = [r for r in runs if r[5] != 0]
                wall = statistics.median(r[0] for r in runs)
                cpu = statistics.median(r[1] + r[2] for r in runs)
                rows.append(
                    f"  {n:16} {wall:7.2f} {cpu:7.2f} {statistics.median(r[1] for r in runs):7.2f}"
                    f" {statistics.median(r[2] for r in runs):7.2f} {statistics.median(r[3] for r in runs):7.0f}"
                    f" {wall - base:+7.2f}" + (f"  ({len(bad)} runs failed)" if bad else "")
                )
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.boot.probe", description=__doc__.split("\n\n")[0])
    ap.add_argument("--image", action="append", help="image dir (disk.raw, vmlinuz, initrd.img, cmdline); repeatable")
    ap.add_argument("--runs", type=int, default=5, help="runs of each case per mode (default 5)")
    ap.add_argument("--cases", help="comma-separated subset of: " + ", ".join(CASES))
    ap.add_argument("--timeout", type=float, default=1200.0)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("probe needs root (unshare --net, debugfs on a copy, QEMU)", file=sys.stderr)
        return 2
    if os.environ.get("PROBE_NETNS") != "1":
        env = {**os.environ, "PROBE_NETNS": "1"}
        return subprocess.call(["unshare", "--net", "--", sys.executable, "-m", "bench.boot.probe", *sys.argv[1:]],
                               env=env, cwd=REPO)  # fmt: skip
    names = args.cases.split(",") if args.cases else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"probe: unknown cases {unknown}", file=sys.stderr)
        return 2
    images = [Path(p) for p in (args.image or [str(REPO / "image" / "build")])]
    results = {}
    with tempfile.TemporaryDirectory(prefix="probe-") as work:
        for img in images:
            results[str(img)] = boot(img, names, args.runs, Path(work), args.timeout)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"\nin-guest start-up probe (TCG, -m 1024 -smp 2, quiet guest after multi-user.target), {args.runs} runs")
    print(f"of each case per mode, interleaved rounds; {when}")
    print(table(results, names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
