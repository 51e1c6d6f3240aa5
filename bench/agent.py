"""`make bench`: the boot path's cost, measured against baselines in the same run.

For N runs each (medians, with min-max):
- `python -c pass` (the interpreter's own floor);
- `guest-agent run` against the local fake Azure IMDS + wireserver, for both wireserver
  flavours (JSON /provisioning/health, and the goal-state + XML fallback): wall time,
  CPU time and peak RSS of the agent process; agent start -> the fake wireserver
  receiving Ready; HTTP round trips on the critical path;
- the JSON run again towards what the image runs: `-I`; then the image's `guest-agent` script
  (image/recipe.sh agent_entry: `#!python -I`, bytecode compiled by it) in a venv laid out as
  the image's, started through its `#!` line as systemd does, against that venv's
  `python3 -I -c pass`; and the same over a copy of the package without bytecode, kept so by
  `-B` (what every boot would pay if the image shipped none);
- with `--baseline DIR`, the JSON run of another checkout of the agent (e.g. the main
  branch) for a before/after in one run, as `python -m guest_agent` and as that checkout's
  image started it: through its launcher (`#!python -ISB`, sys.path written in) when the
  checkout has guest_agent/launcher.py, else through the image's script; its package is copied
  and its bytecode compiled first, as this tree's is;
- as root, in a private network namespace: route to IMDS appears -> Ready received;
- `python -X importtime` of one agent run: the modules on the critical path;
- with `--callgrind`, the instructions one run of the script and `python -c pass` execute (valgrind):
  the same every time, however loaded the shared machine is.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import glob
import importlib.util
import os
import re
import shutil
import site
import socket
import statistics
import struct
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
# The distribution's interpreter, as the image runs it (no venv, no editable-install finder in
# site); else the one this venv was made from.
BASE_PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else getattr(sys, "_base_executable", PY)


def spawn(
    argv: list[str], env: dict[str, str] | None = None, cwd: str | None = None
) -> tuple[float, float, float, float, int]:
    """(start_monotonic, wall_s, cpu_s, maxrss_mib, returncode) of one child process."""
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return t0, wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024, proc.returncode


def fmt(values: list[float], unit: str, scale: float = 1.0) -> str:
    v = [x * scale for x in values]
    return f"{statistics.median(v):8.1f} {unit}  ({min(v):.1f}-{max(v):.1f})"


LATE_ADDR = "169.254.169.254"  # only ever inside the bench's own network namespace
LATE_AFTER_S = 0.05


def _new_addr_msg(addr: str, ifindex: int) -> bytes:
    """RTM_NEWADDR for addr/32 on ifindex (rtnetlink(7)): `ip addr add addr/32 dev <if>` as one
    datagram, so the bench holds the interpreter lock for microseconds, not for a netlink
    library's reply parsing while the fake servers wait for it."""
    raw = socket.inet_aton(addr)
    attrs = b"".join(struct.pack("=HH", 8, kind) + raw for kind in (1, 2))  # IFA_ADDRESS, IFA_LOCAL
    ifa = struct.pack("=BBBBI", socket.AF_INET, 32, 0, 0, ifindex)  # family, prefixlen, flags, scope, index
    flags = 0x1 | 0x4 | 0x200 | 0x400  # NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE
    body = ifa + attrs
    return struct.pack("=IHHII", 16 + len(body), 20, flags, 1, 0) + body  # RTM_NEWADDR = 20


class Setup:
    def __init__(self, json_endpoint: bool, *, late_network: bool = False) -> None:
        """late_network: the metadata address gets its route LATE_AFTER_S after the agent
        began waiting for it (as DHCP would), inside a private network namespace."""
        self.late = late_network
        # On tmpfs when there is one, as /run (and so /run/peerpod) is in the pod VM: the fsyncs
        # of the write stage cost nothing there, but tens of ms on this machine's disk.
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.root = tempfile.mkdtemp(prefix="guest-agent-bench-", dir=shm)
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
        if late_network:
            self.rtnl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            self.rtnl.bind((0, 0))

    def argv(self, *pre: str, script: list[str] | None = None) -> list[str]:
        """script: the command that starts the agent instead of `python -m guest_agent`."""
        tail = ["run", "--root", self.root, "--config", self.conf]
        if script:
            return [*script, *tail]
        return [PY, *pre, "-m", "guest_agent", *tail]

    @staticmethod
    def cwd(env: dict[str, str]) -> str:
        """`python -m` puts the working directory first on sys.path: run a baseline from its own tree."""
        return env.get("PYTHONPATH") or REPO

    def runner(
        self, *pre: str, baseline: str | None = None, script: list[str] | None = None
    ) -> Callable[[], dict[str, float]]:
        env = {**self.env, "PYTHONPATH": baseline} if baseline else self.env
        return lambda: self.run_once(pre, env, script)

    def run_once(
        self, pre: tuple[str, ...] = (), env: dict[str, str] | None = None, script: list[str] | None = None
    ) -> dict[str, float]:
        self.imds.requests.clear()
        self.ws.server.requests.clear()
        self.ws.reports.clear()
        net_up: list[float] = []
        waiter = None
        env = dict(env or self.env)
        if self.late:
            # The address (and so the route) appears LATE_AFTER_S after the agent announced its
            # network stage (STATUS=network on a notify socket of our own), so the figure below
            # is "route present -> Ready" however long the interpreter took to start.
            subprocess.run(["ip", "addr", "flush", "dev", "lo", "to", f"{LATE_ADDR}/32"], check=True)
            sock_path = os.path.join(self.root, "notify.sock")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock_path)
            nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            nsock.bind(sock_path)
            nsock.settimeout(30)
            env["NOTIFY_SOCKET"] = sock_path

            def bring_up() -> None:
                try:
                    while b"STATUS=network" not in nsock.recv(4096):
                        pass
                except OSError:
                    return
                time.sleep(LATE_AFTER_S)
                # Taken just before the netlink request that adds the address (and with it the
                # local route): the route cannot exist earlier, so the figure is, if anything,
                # slightly long.  (Before, the time was taken after `ip addr add` exited, a
                # process whose exit the agent could beat under load: negative figures.)
                net_up.append(time.monotonic())
                self.rtnl.send(_new_addr_msg(LATE_ADDR, ifindex=1))  # lo
                self.rtnl.recv(4096)  # the kernel's ack (an error would show as a run timing out)

            waiter = threading.Thread(target=bring_up)
            waiter.start()
        t0, wall, cpu, rss, rc = spawn(self.argv(*pre, script=script), env, cwd=self.cwd(env))
        if waiter is not None:
            waiter.join()
            nsock.close()
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
        if self.late:
            self.rtnl.close()
        self.imds.stop()
        self.ws.stop()
        shutil.rmtree(self.root, ignore_errors=True)


KEY_MODULES = (
    *("requests", "urllib3", "http.client", "yaml", "systemd.daemon", "tomllib", "pyroute2", "socket"),
    # the standard library's largest on the boot path (docs/benchmarks.md says who imports each)
    *("argparse", "logging", "dataclasses", "typing", "pathlib", "hashlib", "shutil", "json", "re", "enum"),
)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def image_venv(path: str, src: str, *, bytecode: bool = True) -> str:
    """A venv at path laid out as the image's /opt/guest-agent, for src's guest_agent package, and
    its `guest-agent` script.  The package is copied into its site-packages; the dependencies are
    this venv's, reached through a .pth line naming its site-packages (whose own .pth files, the
    editable install's finder among them, are not read: the image has none); then
    image/recipe.sh agent_entry writes the script and compiles the bytecode, which is removed
    again from the package's copy with bytecode=False."""
    subprocess.run([PY, "-m", "venv", "--without-pip", path], check=True)
    (site_dir,) = glob.glob(os.path.join(path, "lib", "python3*", "site-packages"))
    package = os.path.join(site_dir, "guest_agent")
    shutil.copytree(os.path.join(src, "guest_agent"), package, ignore=shutil.ignore_patterns("__pycache__"))
    with open(os.path.join(site_dir, "dependencies.pth"), "w") as f:
        f.write("".join(f"{d}\n" for d in site.getsitepackages() if os.path.isdir(d)))
    recipe = os.path.join(REPO, "image", "recipe.sh")
    subprocess.run(["bash", "-c", 'source "$0" && agent_entry "$1"', recipe, path], check=True)
    if not bytecode:
        for cache in glob.glob(os.path.join(package, "**", "__pycache__"), recursive=True):
            shutil.rmtree(cache)
    return os.path.join(path, "bin", "guest-agent")


def compiled_copy(src: str, dst: str) -> str:
    """dst, holding a copy of src/guest_agent with its bytecode compiled, as the image's venv has
    it: without it a baseline would compile its modules on every run (-B in the old
    launcher, PYTHONDONTWRITEBYTECODE or a read-only tree) and lose by ~50 ms for that alone."""
    shutil.copytree(
        os.path.join(src, "guest_agent"), os.path.join(dst, "guest_agent"), ignore=shutil.ignore_patterns("__pycache__")
    )
    compileall.compile_dir(dst, quiet=1, optimize=0)
    return dst


def baseline_script(src: str, package_dir: str, tmp: str) -> tuple[str, list[str]]:
    """(how, command): the checkout src started as its image started it.  One from before issue 22
    has guest_agent/launcher.py, whose script() wrote `#!python -ISB` with sys.path spelled out
    (here: package_dir, the compiled copy, then this venv's site-packages); a later one runs the
    image's script in a venv of its own."""
    old = os.path.join(src, "guest_agent", "launcher.py")
    if not os.path.exists(old):
        return "script", [image_venv(os.path.join(tmp, "venv-baseline"), src)]
    spec = importlib.util.spec_from_file_location("baseline_launcher", old)
    assert spec is not None and spec.loader is not None
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    dirs = [package_dir, *[d for d in site.getsitepackages() if os.path.isdir(d)]]
    path = os.path.join(tmp, "launcher-baseline")
    with open(path, "w") as f:
        f.write(launcher.script(PY, dirs))
    os.chmod(path, 0o755)
    return "launcher", [path]


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


def instructions(argv: list[str], env: dict[str, str]) -> int:
    """Instructions executed by one run of argv (valgrind's callgrind, the process itself only)."""
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *argv],
        env=env,
        capture_output=True,
        text=True,
    ).stderr
    m = re.search(r"Collected : (\d+)", out)
    if m is None:
        raise SystemExit(f"valgrind gave no instruction count: {out[-500:]}")
    return int(m.group(1))


def series(n: int, fn: Callable[[], dict[str, float]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for _ in range(n):
        for k, v in fn().items():
            out.setdefault(k, []).append(v)
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=15)
    p.add_argument("--baseline", metavar="DIR", help="also run the guest_agent package found in DIR (before/after)")
    p.add_argument(
        "--callgrind",
        action="store_true",
        help="also count the instructions of one run of each script and of `python -c pass` (valgrind)",
    )
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    n = args.runs
    if os.geteuid() == 0 and not args.in_netns and shutil.which("unshare"):
        # A private network namespace with only lo: the late-network series adds an
        # address there, and nothing can leave the machine.
        extra = ["--baseline", os.path.abspath(args.baseline)] if args.baseline else []
        extra += ["--callgrind"] if args.callgrind else []
        argv = [PY, "-m", "bench.agent", "--runs", str(n), "--in-netns", *extra]
        return subprocess.call(["unshare", "--net", "--", *argv])
    if args.in_netns:
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)

    def base(code: str, *flags: str, exe: str = PY) -> Callable[[], dict[str, float]]:
        def f() -> dict[str, float]:
            _, wall, cpu, rss, _ = spawn([exe, *flags, "-c", code])
            return {"wall": wall, "cpu": cpu, "rss": rss}

        return f

    flavours = {"json": Setup(json_endpoint=True), "xml": Setup(json_endpoint=False)}
    script_dir = tempfile.mkdtemp(prefix="guest-agent-bench-script-")
    script = [image_venv(os.path.join(script_dir, "venv"), REPO)]
    # The same without the package's bytecode; -B keeps it so from run to run.
    nopyc_venv = os.path.join(script_dir, "venv-nopyc")
    script_nopyc = [os.path.join(nopyc_venv, "bin", "python3"), "-IB", image_venv(nopyc_venv, REPO, bytecode=False)]
    series_fns: list[tuple[str, Callable[[], dict[str, float]]]] = [
        ("python -c pass", base("pass")),
        ("python -I -c pass", base("pass", "-I")),
        ("base python3 -c pass", base("pass", exe=BASE_PY)),
        ("base python3 -I -c pass", base("pass", "-I", exe=BASE_PY)),
        (
            "image-like venv python3 -I -c pass",
            base("pass", "-I", exe=os.path.join(script_dir, "venv", "bin", "python3")),
        ),
        ("guest-agent run (JSON health)", flavours["json"].runner()),
        ("guest-agent run (XML fallback)", flavours["xml"].runner()),
        ("guest-agent run (JSON, -I)", flavours["json"].runner("-I")),
        ("guest-agent run (JSON, script)", flavours["json"].runner(script=script)),
        ("  same, guest_agent without bytecode", flavours["json"].runner(script=script_nopyc)),
    ]
    baseline = compiled_copy(args.baseline, os.path.join(script_dir, "baseline")) if args.baseline else None
    if baseline:
        # A root of its own: another version may leave /run/peerpod in a shape this one refuses.
        flavours["json-baseline"] = Setup(json_endpoint=True)
        series_fns.append(("baseline run (JSON health)", flavours["json-baseline"].runner(baseline=baseline)))
        how, base_script = baseline_script(args.baseline, baseline, script_dir)
        base_name = f"baseline run (JSON, {how})"
        series_fns.append((base_name, flavours["json-baseline"].runner(script=base_script)))
    if args.in_netns:
        flavours["late"] = Setup(json_endpoint=True, late_network=True)
        series_fns.append(("guest-agent run (network late)", flavours["late"].runner()))
        if baseline:
            flavours["late-baseline"] = Setup(json_endpoint=True, late_network=True)
            late = flavours["late-baseline"].runner(baseline=baseline)
            series_fns.append(("baseline run (network late)", late))
    results: dict[str, dict[str, list[float]]] = {}
    try:
        # Interleave the series so drift in machine load hits all of them alike.
        for _ in range(n):
            for name, fn in series_fns:
                for k, v in series(1, fn).items():
                    results.setdefault(name, {}).setdefault(k, []).extend(v)
        counted = []
        if args.callgrind:
            counted.append(("python -c pass", instructions([PY, "-c", "pass"], flavours["json"].env)))
            counted.append(
                (
                    "guest-agent run (JSON, script)",
                    instructions(flavours["json"].argv(script=script), flavours["json"].env),
                )
            )
            if baseline:
                b = flavours["json-baseline"]
                counted.append((base_name, instructions(b.argv(script=base_script), b.env)))
        # As the image starts it: the script's flags.
        imports = importtime(
            [
                os.path.join(script_dir, "venv", "bin", "python3"),
                "-X",
                "importtime",
                "-I",
                *flavours["json"].argv(script=script),
            ],
            flavours["json"].env,
        )
    finally:
        for s in flavours.values():
            s.stop()
        shutil.rmtree(script_dir, ignore_errors=True)

    floor = statistics.median(results["python -c pass"]["wall"])
    cpu_floor = statistics.median(results["python -c pass"]["cpu"])
    print(f"\nguest-agent bench: {n} runs each, interleaved; medians (min-max); Python {sys.version.split()[0]}")
    print("(x floor: the median over `python -c pass`'s median, for wall time and for CPU time)")
    print(f"{'':34} {'wall':>22} {'x floor':>8} {'CPU':>22} {'x floor':>8} {'peak RSS':>22}")
    for name, r in results.items():
        print(
            f"{name:34} {fmt(r['wall'], 'ms', 1000)} {statistics.median(r['wall']) / floor:7.1f}x "
            f"{fmt(r['cpu'], 'ms', 1000)} {statistics.median(r['cpu']) / cpu_floor:7.1f}x {fmt(r['rss'], 'MiB')}"
        )
    print("\nagent start -> fake wireserver received Ready, and HTTP requests made before it:")
    for name, r in results.items():
        if "to_ready" not in r:
            continue
        rt, ws = statistics.median(r["round_trips"]), statistics.median(r["ws_round_trips"])
        print(f"  {name:36} {fmt(r['to_ready'], 'ms', 1000)}   requests: {rt:.0f} ({ws:.0f} to the wireserver)")
    late_runs = [name for name in results if "network late" in name]
    if late_runs:
        print("\nnetwork up (route to IMDS appears) -> fake wireserver received Ready:")
        for name in late_runs:
            print(f"  {name:36} {fmt(results[name]['net_to_ready'], 'ms', 1000)}")
    if counted:
        print("\ninstructions of one process (valgrind --tool=callgrind; load does not change them):")
        for name, n in counted:
            print(f"  {name:36} {n / 1e6:8.1f} M   {n / counted[0][1]:4.2f}x python -c pass")
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
