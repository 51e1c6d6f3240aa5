"""`make bench`: the boot path's cost, measured against baselines in the same run.

For N runs each (medians, with min-max):
- `python -c pass` and `python -c 'import requests'` (the interpreter's own floor);
- `guest-agent run` against the local fake Azure IMDS + wireserver, for both wireserver
  flavours (JSON /provisioning/health, and the goal-state + XML fallback): wall time,
  CPU time and peak RSS of the agent process; agent start -> the fake wireserver
  receiving Ready; HTTP round trips on the critical path;
- `python -X importtime` of one agent run: the modules on the critical path.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from tests import caa
from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Script
from tests.fakecloud.wireserver import FakeWireserver

PY = sys.executable


def spawn(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float, float, int]:
    """(start_monotonic, wall_s, cpu_s, maxrss_mib, returncode) of one child process."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return t0, wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, proc.returncode


def fmt(values: list[float], unit: str, scale: float = 1.0) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):8.1f} {unit}  ({min(v):.1f}-{max(v):.1f})"


LATE_ADDR = "169.254.169.254"  # only ever inside the bench's own network namespace
LATE_AFTER_S = 0.3


class Setup:
    def __init__(self, json_endpoint: bool, *, late_network: bool = False) -> None:
        """late_network: the metadata address gets its route LATE_AFTER_S after the agent
        starts (as DHCP would), inside a private network namespace."""
        self.late = late_network
        self.root = tempfile.mkdtemp(prefix="guest-agent-bench-")
        caa.make_root(self.root, caa.AZURE_DMI)
        ud = caa.cloud_config(initdata=caa.initdata_toml())
        host = "0.0.0.0" if late_network else "127.0.0.1"  # 0.0.0.0 only in the private namespace
        self.imds = FakeServer("imds", imds.azure(ud, Script()), host=host).start()
        self.ws = FakeWireserver(json_endpoint=json_endpoint).start()
        self.conf = os.path.join(self.root, "bench.toml")
        imds_url = f"http://{LATE_ADDR}:{self.imds.port}" if late_network else self.imds.url
        with open(self.conf, "w") as f:
            f.write(
                f'[azure]\nimds_url = "{imds_url}"\nwireserver_url = "{self.ws.url}"\n'
                "[netns]\nenabled = false\n[tpm]\nenabled = false\n"
            )
        self.env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}

    def argv(self, *pre: str) -> list[str]:
        return [PY, *pre, "-m", "guest_agent", "run", "--root", self.root, "--config", self.conf]

    def run_once(self) -> dict[str, float]:
        self.imds.requests.clear()
        self.ws.server.requests.clear()
        self.ws.reports.clear()
        net_up: list[float] = []
        timer = None
        if self.late:
            subprocess.run(["ip", "addr", "flush", "dev", "lo", "to", f"{LATE_ADDR}/32"], check=True)

            def bring_up() -> None:
                net_up.append(time.monotonic())
                subprocess.run(["ip", "addr", "add", f"{LATE_ADDR}/32", "dev", "lo"], check=True)

            timer = threading.Timer(LATE_AFTER_S, bring_up)
            timer.start()
        t0, wall, cpu, rss, rc = spawn(self.argv(), self.env)
        if timer is not None:
            timer.join()
        if rc != 0:
            raise SystemExit(f"agent run failed with exit code {rc}")
        ready = [r for r in self.ws.server.requests if r.method == "POST"]
        reqs = self.imds.requests + self.ws.server.requests
        extra = {"net_to_ready": ready[-1].t_mono - net_up[0]} if net_up else {}
        return {
            **extra,
            "wall": wall,
            "cpu": cpu,
            "rss": rss,
            "to_ready": ready[-1].t_mono - t0,
            "round_trips": len([r for r in reqs if r.t_mono <= ready[-1].t_mono]),
            "ws_round_trips": len([r for r in self.ws.server.requests if r.t_mono <= ready[-1].t_mono]),
        }

    def stop(self) -> None:
        self.imds.stop()
        self.ws.stop()


KEY_MODULES = ("requests", "urllib3", "yaml", "systemd.daemon", "tomllib", "pyroute2")


def importtime(argv: list[str], env: dict[str, str]) -> tuple[int, list[tuple[int, str]]]:
    """(total self µs, [(cumulative µs, name)]) for our modules and the heavy dependencies.

    Imports made inside functions (the agent's lazy ones) are reported deeper in the tree,
    so modules are picked by name, not by indentation."""
    out = subprocess.run(argv, env=env, capture_output=True, text=True).stderr
    total, rows = 0, []
    for line in out.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|\s*(\S+)", line)
        if not m:
            continue
        total += int(m.group(1))
        name = m.group(3)
        if name.startswith("guest_agent") or name in KEY_MODULES:
            rows.append((int(m.group(2)), name))
    return total, rows


def series(n: int, fn: Callable[[], dict[str, float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for _ in range(n):
        for k, v in fn().items():
            out.setdefault(k, []).append(v)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    n = args.runs
    if os.geteuid() == 0 and not args.in_netns and shutil.which("unshare"):
        # A private network namespace with only lo: the late-network series adds an
        # address there, and nothing can leave the machine.
        return subprocess.call(["unshare", "--net", "--", PY, "-m", "tests.bench", "--runs", str(n), "--in-netns"])
    if args.in_netns:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    def base(code: str) -> Callable[[], dict[str, float]]:
        def f() -> dict[str, float]:
            _, wall, cpu, rss, _ = spawn([PY, "-c", code])
            return {"wall": wall, "cpu": cpu, "rss": rss}

        return f

    flavours = {"json": Setup(json_endpoint=True), "xml": Setup(json_endpoint=False)}
    series_fns: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("python -c pass", base("pass")),
        ("python -c 'import requests'", base("import requests")),
        ("guest-agent run (JSON health)", flavours["json"].run_once),
        ("guest-agent run (XML fallback)", flavours["xml"].run_once),
    ]
    if args.in_netns:
        flavours["late"] = Setup(json_endpoint=True, late_network=True)
        series_fns.append(("guest-agent run (network +300 ms)", flavours["late"].run_once))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        # Interleave the series so drift in machine load hits all of them alike.
        for _ in range(n):
            for name, fn in series_fns:
                for k, v in series(1, fn).items():
                    results.setdefault(name, {}).setdefault(k, []).extend(v)
        imports = importtime(flavours["json"].argv("-X", "importtime"), flavours["json"].env)
    finally:
        for s in flavours.values():
            s.stop()

    floor = statistics.median(results["python -c pass"]["wall"])
    print(f"\nguest-agent bench: {n} runs each, interleaved; medians (min-max); Python {sys.version.split()[0]}")
    print(f"{'':34} {'wall':>22} {'x floor':>8} {'CPU':>22} {'peak RSS':>22}")
    for name, r in results.items():
        print(
            f"{name:34} {fmt(r['wall'], 'ms', 1000)} {statistics.median(r['wall']) / floor:7.1f}x "
            f"{fmt(r['cpu'], 'ms', 1000)} {fmt(r['rss'], 'MiB')}"
        )
    print("\nagent start -> fake wireserver received Ready, and HTTP requests made before it")
    print("(the goal-state GET is a prefetch that runs in parallel with the user-data fetch):")
    for name, r in results.items():
        if "to_ready" not in r:
            continue
        rt, ws = statistics.median(r["round_trips"]), statistics.median(r["ws_round_trips"])
        print(f"  {name:36} {fmt(r['to_ready'], 'ms', 1000)}   requests: {rt:.0f} ({ws:.0f} to the wireserver)")
    if "guest-agent run (network +300 ms)" in results:
        r = results["guest-agent run (network +300 ms)"]
        print("\nnetwork up (route to IMDS appears) -> fake wireserver received Ready:")
        print(f"  {'guest-agent run (network +300 ms)':36} {fmt(r['net_to_ready'], 'ms', 1000)}")
    total_us, rows = imports
    print(f"\nimports of one agent run (python -X importtime): {total_us / 1000:.1f} ms in all; cumulative per module:")
    for us, name in rows:
        print(f"  {us / 1000:7.1f} ms  {name}")
    loaded = {name for _, name in rows}
    print(f"\npyroute2 imported on the boot path: {'YES' if 'pyroute2' in loaded else 'no'}")
    _, wall, *_ = spawn([PY, "-c", "import pyroute2"])
    pr_total, _ = importtime([PY, "-X", "importtime", "-c", "import pyroute2"], os.environ.copy())
    pr_ms = pr_total / 1000
    print(f"  (for scale: import pyroute2 alone = {pr_ms:.1f} ms, its process {wall * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
