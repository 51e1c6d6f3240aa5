"""Boot benchmark: guest-agent against cloud-init + waagent, CAA's own chain and no agent (`make bench-boot`).

Seven variants (image/variants/build-variant.sh): `guest-agent` (the product: image/build.sh's tuned
image), `guest-agent-deb` (the same tuned image with the agent installed from the project's .deb by
apt instead of the venv: what the package route costs), `floor-tuned` (the same tuned image without
the agent: what the agent costs), `floor-stock` (the stock base without an agent), `cloudinit`
(cloud-init + waagent as Debian's Azure images configure them, stock base), `caa-chain` (CAA's pod VM
units with stand-in programs, stock base) and `caa-chain-tuned` (the same chain on the tuned image:
guest-agent against it is the agent's own gain, without the tuning's).

Boots each variant's image under QEMU (TCG, `-m 1024 -smp 2`) against the same fake Azure fabric, in
one run and interleaved (A B C A B C ...), and measures from the host's QEMU start stamp:

    DHCP lease, user-data fetched, config files written, Ready at the wireserver, APF listening,
    multi-user.target; the DHCP->Ready gap; CPU time and peak memory of the provisioning services;
    memory still in use after boot; image size over the variant's floor; the issue's goals
    (guest-agent's ratios to both incumbents, its cost over floor-tuned, DHCP lease -> Ready); and
    the pairs that split a gain into the agent's own and the image tuning's (SPLITS).

Sources of each figure (docs/protocols.md §6): the fake servers stamp every request on arrival
(host clock); the guest's report unit (image/variants/overlay-bench/usr/local/libexec/bench-report)
sends systemd's monotonic timestamps, file mtimes, journal and the incumbents' logs, and prints
`BENCH-SYNC <monotonic>` lines on the console, which the host stamps on arrival to map guest
monotonic time onto its own clock.

Network safety: the whole run happens in a private network namespace with only `lo` (this module
re-executes itself under `unshare --net`); the guest reaches only the fakes through QEMU's restricted
user networking and `guestfwd` relays to 127.0.0.1.  Every boot holds `flock /tmp/guest-agent-qemu.lock`
so it never overlaps another QEMU boot on the machine (the e2e suite takes the same lock).

The caa-chain variant is CAA's pod VM unit graph with stand-in programs that send the requests CAA's
process-user-data and azure-ready send (image/variants/overlay-caa-chain); see docs/benchmarks.md.

    python -m bench.boot.run [--runs 3] [--variants V1,V2,...] [--no-docs]   (default: all seven)
"""

from __future__ import annotations

import argparse
import base64
import calendar
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.boot.fabric import BenchFabric, ovf_env_xml
from tests.e2e import userdata
from tests.fakecloud.wireserver import HealthReport

REPO = Path(__file__).resolve().parents[2]
VARIANTS_DIR = REPO / "image" / "variants"
DOCS = REPO / "docs"
LOCK = "/tmp/guest-agent-qemu.lock"
MAC = "52:54:00:12:34:56"
APF_PORT = 15150
NAMES = {
    "guest-agent": "guest-agent (tuned image)",
    "guest-agent-deb": "guest-agent from the .deb (tuned image)",
    "cloudinit": "cloud-init + waagent",
    "caa-chain": "CAA's chain (stand-ins)",
    "caa-chain-tuned": "CAA's chain on the tuned image",
    "floor-tuned": "no agent, tuned image (floor-tuned)",
    "floor-stock": "no agent, stock image (floor-stock)",
}
# `make bench-boot`'s variants, in the order of each round (Makefile and image/disk-budget.sh list the same).
DEFAULT_VARIANTS = (
    "guest-agent",
    "guest-agent-deb",
    "floor-tuned",
    "floor-stock",
    "cloudinit",
    "caa-chain",
    "caa-chain-tuned",
)
# The image each variant is built on top of: its "added over the floor" size is measured against it.
FLOOR_OF = {
    "guest-agent": "floor-tuned",
    "guest-agent-deb": "floor-tuned",
    "cloudinit": "floor-stock",
    "caa-chain": "floor-stock",
    "caa-chain-tuned": "floor-tuned",
}
# Provisioning services per variant: their CPU time and memory are "the agent's cost".
PROVISIONING = {
    "guest-agent": ["guest-agent.service"],
    "guest-agent-deb": ["guest-agent.service"],
    "cloudinit": [
        "cloud-init-local.service",
        "cloud-init.service",
        "cloud-config.service",
        "cloud-final.service",
        "walinuxagent.service",
    ],
    # CAA's two provisioning programs (stand-ins: image/variants/overlay-caa-chain).
    "caa-chain": ["process-user-data.service", "azure-ready.service"],
    "caa-chain-tuned": ["process-user-data.service", "azure-ready.service"],
    "floor-tuned": [],
    "floor-stock": [],
}
# Files the user-data's write_files creates (the same three for every variant that provisions).
WRITTEN = ("apf.json", "auth.json", "initdata")
AZURE_SMBIOS = (
    "type=1,manufacturer=Microsoft Corporation,product=Virtual Machine,version=Hyper-V UEFI Release v4.1",
    "type=3,manufacturer=Microsoft Corporation,asset=7783-7084-3265-9085-8269-3286-77",
)
MILESTONES = (
    ("dhcp", "DHCP lease"),
    ("userdata", "user-data fetched"),
    ("files", "config files written"),
    ("ready", "Ready at the wireserver"),
    ("apf", "APF listening"),
    ("multi_user", "multi-user.target"),
)


def log(msg: str) -> None:
    print(f"[bench-boot {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- one boot


@dataclass
class Boot:
    variant: str
    round: int
    t0: float = 0.0  # host time.time() just before QEMU starts
    console: list[tuple[float, str]] = field(default_factory=list)
    doc: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0
    qemu_rc: int | None = None
    error: str | None = None
    figures: dict[str, float | None] = field(default_factory=dict)
    contended: list[int] = field(default_factory=list)  # other QEMUs seen running during this boot


def kind(variant: str) -> str:
    """An experiment's variant `<kind>+<name>` (a built image directory image/variants/build/<kind>+<name>,
    e.g. guest-agent with a unit drop-in) is measured like its kind: `--variants guest-agent,guest-agent+x`."""
    return variant.split("+", 1)[0]


def settled_when(variant: str) -> Any:
    """The health report after which the variant's provisioning is over (the report unit then measures)."""

    def ga(reports: list[HealthReport]) -> bool:
        return any(r.state == "Ready" for r in reports)

    def ci(reports: list[HealthReport]) -> bool:
        # waagent reports after cloud-init; both send x-ms-agent-name WALinuxAgent, User-Agent differs.
        return any(
            r.state == "Ready" and "walinuxagent" in (r.request.header("user-agent") or "").lower() for r in reports
        )

    k = kind(variant)
    if not PROVISIONING.get(k):
        return lambda _r: True  # floors: at once
    return ci if k == "cloudinit" else ga  # guest-agent and CAA's chain: the first Ready


def other_qemus(own: int | None = None) -> list[int]:
    """PIDs of QEMU processes that are not this boot's (`pgrep -f qemu-system`, without pgrep).

    A process with exactly this boot's QEMU command line is one of its forks that has not exec'd
    its relay yet, whatever its parent (the fork that runs a guestfwd command can be a grandchild)."""
    mine = b""
    if own is not None:
        with contextlib.suppress(OSError):
            mine = Path(f"/proc/{own}/cmdline").read_bytes()
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == own:
            continue
        try:
            cmdline = Path(f"/proc/{d}/cmdline").read_bytes()
        except OSError:
            continue
        ours = own is not None and (parent(int(d)) == own or cmdline == mine)
        if b"qemu-system" in cmdline.split(b"\0", 1)[0] and not ours:
            out.append(int(d))
    return out


def parent(pid: int) -> int | None:
    """The parent PID: QEMU forks a child for every `guestfwd=...-cmd:` connection, which shows
    QEMU's own argv until it execs the relay; those children are this boot's, not contention."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def watch_contention(own: int, stop: threading.Event, seen: list[int]) -> None:
    while not stop.wait(0.5):
        for pid in other_qemus(own):
            if pid not in seen:
                seen.append(pid)


def parse_dump(text: str) -> dict[str, Any] | None:
    m = re.search(r"BENCH-BEGIN\n(.*?)BENCH-END sha256=([0-9a-f]{64})", text, re.S)
    if not m:
        return None
    blob = base64.b64decode(m.group(1))
    if hashlib.sha256(blob).hexdigest() != m.group(2):
        return None
    doc: dict[str, Any] = json.loads(gzip.decompress(blob))
    return doc


def read_console(proc: subprocess.Popen[bytes], out: list[tuple[float, str]], path: Path) -> None:
    assert proc.stdout is not None
    with path.open("w", encoding="utf-8") as f:
        for raw in proc.stdout:
            t = time.time()
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            out.append((t, line))
            f.write(f"{t:.6f} {line}\n")


def boot(variant: str, rnd: int, work: Path, timeout_s: float) -> Boot:
    b = Boot(variant, rnd)
    img = VARIANTS_DIR / "build" / variant
    wd = work / f"{rnd:02d}-{variant}"
    wd.mkdir(parents=True)
    ud, _expected = userdata.valid()
    vm_id = str(uuid.uuid4())
    fabric_log = (wd / "fabric.jsonl").open("w")
    fabric = BenchFabric(ud, vm_id, settled_when(variant), time.time() + 3600, mac=MAC, log=fabric_log).start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        # Provisioning ISO with ovf-env.xml (CustomData = the same user-data), attached to every variant
        # as Azure attaches it to every VM; only cloud-init reads it.
        iso_dir = wd / "iso"
        iso_dir.mkdir()
        (iso_dir / "ovf-env.xml").write_bytes(ovf_env_xml(ud))
        iso = wd / "ovf.iso"
        subprocess.run(
            ["genisoimage", "-quiet", "-V", "rd_rdfe_stable.bench", "-J", "-R", "-o", str(iso), str(iso_dir)],
            check=True,
            timeout=30,
        )
        tpm_dir = wd / "tpm"
        tpm_dir.mkdir()
        tpm_sock = wd / "swtpm.sock"
        procs.append(
            subprocess.Popen(
                [
                    "swtpm",
                    "socket",
                    "--tpm2",
                    "--tpmstate",
                    f"dir={tpm_dir}",
                    "--ctrl",
                    f"type=unixio,path={tpm_sock}",
                    "--terminate",
                    "--log",
                    f"file={wd / 'swtpm.log'}",
                ],
            )
        )
        for _ in range(100):
            if tpm_sock.exists():
                break
            time.sleep(0.05)
        overlay = wd / "overlay.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(img / "disk.raw"), str(overlay)],
            check=True,
            timeout=30,
        )
        ports = fabric.ports
        netdev = (
            "user,id=n0,restrict=on,ipv6=off,net=168.0.0.0/7,host=168.0.0.1,dhcpstart=168.0.0.4,dns=168.0.0.2"
            f",guestfwd=tcp:169.254.169.254:80-cmd:socat - TCP:127.0.0.1:{ports['imds']}"
            f",guestfwd=tcp:168.63.129.16:80-cmd:socat - TCP:127.0.0.1:{ports['wire']}"
            f",guestfwd=tcp:168.63.129.16:32526-cmd:socat - TCP:127.0.0.1:{ports['hgap']}"
            f",hostfwd=tcp:127.0.0.1:{APF_PORT}-:{APF_PORT}"
        )
        # The image's own kernel command line (image/variants/build-variant.sh writes it) + the report unit.
        cmdline = (img / "cmdline").read_text().strip() + " systemd.wants=bench-report.service"
        ttys1 = wd / "ttyS1.log"
        argv = [
            "qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "2",
            # No hypervisor CPUID bit: systemd then says "microsoft" (waagent's ConditionVirtualization).
            # RDRAND, which every cloud's CPUs have and qemu64 lacks: Debian's kernel trusts it
            # (CONFIG_RANDOM_TRUST_CPU=y) and seeds its CRNG at once, as on a cloud VM.  Without it
            # the CRNG is seeded 2-4 s into userspace and the first Python process of the boot waits
            # for it (docs/boot-placement.md).  tests/e2e keeps qemu64 without it: that path is
            # tested there.
            "-cpu", "qemu64,+rdrand,-hypervisor",
            "-nodefaults", "-display", "none", "-no-reboot",
            "-kernel", str(img / "vmlinuz"), "-initrd", str(img / "initrd.img"), "-append", cmdline,
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-drive", f"file={iso},media=cdrom,if=ide,readonly=on",
            "-netdev", netdev, "-device", f"virtio-net-pci,netdev=n0,mac={MAC}",
            "-chardev", f"socket,id=chrtpm,path={tpm_sock}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-tis,tpmdev=tpm0",
            "-serial", "stdio", "-serial", f"file:{ttys1}",
            "-smbios", AZURE_SMBIOS[0], "-smbios", AZURE_SMBIOS[1], "-uuid", vm_id,
        ]  # fmt: skip
        (wd / "qemu.argv").write_text(shlex.join(argv) + "\n")
        with open(LOCK, "a") as lockf:
            t_wait = time.time()
            fcntl.flock(lockf, fcntl.LOCK_EX)
            # Not every QEMU user on the machine takes the lock: also wait until no other QEMU runs.
            while other_qemus():
                time.sleep(1)
            if time.time() - t_wait > 1:
                log(f"waited {time.time() - t_wait:.0f} s for {LOCK} and for other QEMUs to finish")
            b.t0 = time.time()
            fabric.wire.settle_deadline = b.t0 + timeout_s * 0.6
            qemu = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=(wd / "qemu.err").open("wb")
            )
            procs.append(qemu)
            reader = threading.Thread(target=read_console, args=(qemu, b.console, wd / "console.log"), daemon=True)
            reader.start()
            stop_watch = threading.Event()
            watcher = threading.Thread(target=watch_contention, args=(qemu.pid, stop_watch, b.contended), daemon=True)
            watcher.start()
            try:
                b.qemu_rc = qemu.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                b.error = f"QEMU still running after {timeout_s:.0f} s"
                qemu.kill()
                qemu.wait()
            b.wall_s = time.time() - b.t0
            stop_watch.set()
        reader.join(5)
        if ttys1.exists():
            b.doc = parse_dump(ttys1.read_text(errors="replace"))
        if b.doc is None and b.error is None:
            b.error = "no report from the guest"
        b.events = [e.__dict__ for e in fabric.events()]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
        fabric.stop()
        fabric_log.close()
    (wd / "events.json").write_text(json.dumps(b.events, indent=1))
    if b.doc is not None:
        (wd / "report.json").write_text(json.dumps(b.doc, indent=1))
    b.figures = figures(b)
    return b


# ---------------------------------------------------------------- figures of one boot

CLOUDINIT_LOG_TS = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - (.*)$")


def mono_offset(b: Boot) -> float | None:
    """host time - guest monotonic, from the BENCH-SYNC console lines (smallest = least delayed)."""
    offs = [t - float(m.group(1)) for t, line in b.console if (m := re.search(r"BENCH-SYNC (\d+\.\d+)", line))]
    return min(offs) if offs else None


def cloudinit_dhcp_mono(doc: dict[str, Any]) -> float | None:
    """cloud-init-local's own ephemeral DHCP: the log line after dhclient got its lease."""
    text = doc.get("logs", {}).get("/var/log/cloud-init.log", "")
    rt_minus_mono = float(doc["realtime_minus_mono"])
    for line in text.splitlines():
        m = CLOUDINIT_LOG_TS.match(line)
        if not m:
            continue
        msg = m.group(2)
        # 22.4: net/dhcp.py logs the parsed lease once dhclient has written it; the ephemeral network
        # set-up follows.  Take the first line that shows a lease was received.
        if re.search(r"Received dhcp lease|dhcp lease on|Attempting setup of ephemeral network on", msg):
            # cloud-init logs local time; the image has no time zone set, so that is UTC.
            wall = calendar.timegm(time.strptime(m.group(1)[:19], "%Y-%m-%d %H:%M:%S")) + int(m.group(1)[20:]) / 1000
            return wall - rt_minus_mono
    return None


def ts_mono(props: dict[str, str], key: str = "ActiveEnterTimestampMonotonic") -> float | None:
    v = props.get(key, "")
    return int(v) / 1e6 if v.isdigit() and int(v) > 0 else None


# Figures also given from systemd's start (init.scope's start): the kernel's and the initrd's share,
# which moves by seconds with the host's load, taken out (docs/benchmarks.md, "Reading the boot
# figures").  Each is `<figure>_sys`.
SINCE_SYSTEMD = ("agent_process", "agent_warm", "dhcp", "ready", "apf", "multi_user")


def since_systemd(f: dict[str, float | None]) -> dict[str, float | None]:
    """`<figure>_sys` for each of SINCE_SYSTEMD: the figure minus this boot's `systemd`."""
    t0 = f.get("systemd")
    return {f"{k}_sys": None if (v := f.get(k)) is None or t0 is None else round(v - t0, 3) for k in SINCE_SYSTEMD}


def figures(b: Boot) -> dict[str, float | None]:
    f: dict[str, float | None] = {k: None for k, _ in MILESTONES}
    doc = b.doc
    off = mono_offset(b)
    ev = b.events

    def rel(t: float | None) -> float | None:
        return None if t is None else round(t - b.t0, 3)

    def g2h(m: float | None) -> float | None:  # guest monotonic -> host time
        return None if (m is None or off is None) else m + off

    # user-data fetched: the first IMDS answer that carried it (guest-agent: compute/userData;
    # cloud-init: the /metadata/instance document with compute.userData, after reading the ISO).
    ud = [
        e["t"]
        for e in ev
        if e["server"] == "imds"
        and e["status"] == 200
        and (e["path"].startswith("/metadata/instance/compute/userData") or e["path"].startswith("/metadata/instance?"))
    ]
    f["userdata"] = rel(min(ud)) if ud else None
    readies = [e for e in ev if e["server"] == "wire" and e["state"] == "Ready" and e["status"] in (200, 201, 202)]
    f["ready"] = rel(readies[0]["t"]) if readies else None
    wa = [e for e in readies if e["agent"] == "waagent"]
    f["ready_waagent"] = rel(wa[0]["t"]) if wa else None
    f["fabric_requests"] = float(len(ev))
    if doc is None:
        return f
    units = doc["units"]
    rt_minus_mono = float(doc["realtime_minus_mono"])
    # DHCP lease: the first one in the guest (cloud-init-local's own client, else systemd-networkd).
    leases = [e["mono"] for e in doc.get("networkd", []) if "DHCPv4 address" in (e["msg"] or "")]
    ci = cloudinit_dhcp_mono(doc)
    cands = [m for m in [*leases[:1], ci] if m is not None]
    f["dhcp"] = rel(g2h(min(cands))) if cands else None
    pp = doc.get("peerpod", {})
    if all(n in pp for n in WRITTEN):
        f["files"] = rel(g2h(max(pp[n]["mtime_ns"] for n in WRITTEN) / 1e9 - rt_minus_mono))
    if units.get("agent-protocol-forwarder.service", {}).get("ActiveState") == "active":
        f["apf"] = rel(g2h(ts_mono(units["agent-protocol-forwarder.service"])))
    f["multi_user"] = rel(g2h(ts_mono(units["multi-user.target"])))
    # guest-agent's own timeline (/run/guest-agent/timeline.json, CLOCK_MONOTONIC): when its process
    # started and when its interpreter start-up and imports were done (`agent_start`), i.e. when it was
    # ready to wait for the route.  "Warm before the lease" means agent_warm < dhcp.
    tl = doc.get("timeline") or {}
    if isinstance(tl.get("process_start"), (int, float)):
        f["agent_process"] = rel(g2h(float(tl["process_start"])))
    if isinstance(tl.get("agent_start"), (int, float)):
        f["agent_warm"] = rel(g2h(float(tl["agent_start"])))
    if f["dhcp"] is not None and f["ready"] is not None:
        f["gap_dhcp_ready"] = round(f["ready"] - f["dhcp"], 3)
    f["systemd"] = rel(g2h(ts_mono(units.get("init.scope", {}), "InactiveExitTimestampMonotonic")))
    f.update(since_systemd(f))
    # CPU: systemd's per-unit CPUUsageNSec, summed over the variant's provisioning services.
    cpu = 0.0
    for u in PROVISIONING[kind(b.variant)]:
        v = units.get(u, {}).get("CPUUsageNSec", "")
        if v.isdigit() and int(v) < 2**63:
            cpu += int(v) / 1e9
    cg = doc.get("cgroups", {})
    top = cg.get("/bench.slice", {})
    if PROVISIONING[kind(b.variant)]:
        f["cpu_s"] = round(cpu, 3)
        f["cpu_slice_s"] = round(top.get("cpu.stat", {}).get("usage_usec", 0) / 1e6, 3)
        # memory.peak of the services' slices (systemd 252 has no MemoryPeak property): kernel figure,
        # page cache the services faulted in included.
        f["mem_peak_mib"] = round(top.get("memory.peak", 0) / 2**20, 1) if "memory.peak" in top else None
        f["prov_resident_mib"] = round(top.get("memory.current", 0) / 2**20, 1)
    mi = doc["meminfo"]
    f["used_after_boot_mib"] = round((mi["MemTotal"] - mi["MemAvailable"]) / 1024, 1)
    f["report_at"] = rel(g2h(float(doc["t_measure"])))
    return f


# ---------------------------------------------------------------- the run


def image_sizes(variants: list[str]) -> dict[str, float]:
    out = {}
    for v in variants:
        m = json.loads((VARIANTS_DIR / "build" / v / "manifest.json").read_text())
        out[v] = float(m["rootfs_mib"])
    return out


def stats(vals: list[float | None]) -> dict[str, float] | None:
    xs = [v for v in vals if v is not None]
    if not xs:
        return None
    return {"median": round(statistics.median(xs), 3), "min": min(xs), "max": max(xs), "n": len(xs)}


ROWS = (
    ("agent_process", "guest-agent process started"),
    ("agent_warm", "guest-agent warm (imports done, waiting for the route)"),
    *MILESTONES,
    ("ready_waagent", "Ready sent by waagent"),
    ("gap_dhcp_ready", "gap DHCP lease -> Ready"),
    ("cpu_s", "CPU time of the provisioning services (s)"),
    ("mem_peak_mib", "peak memory of the provisioning services (MiB)"),
    ("prov_resident_mib", "memory the provisioning services still hold (MiB)"),
    ("used_after_boot_mib", "memory in use after boot, whole VM (MiB)"),
)


def summarise(boots: list[Boot], variants: list[str]) -> dict[str, Any]:
    res: dict[str, Any] = {}
    for v in variants:
        bs = [b for b in boots if b.variant == v]
        keys = {k for b in bs for k in b.figures}
        res[v] = {k: stats([b.figures.get(k) for b in bs]) for k in sorted(keys)}
    return res


def fmt_cell(s: dict[str, float] | None, unit: str = "") -> str:
    if s is None:
        return "-"
    if s["min"] == s["max"]:
        return f"{s['median']:.1f}{unit}"
    return f"{s['median']:.1f}{unit} ({s['min']:.1f}-{s['max']:.1f})"


def ratio(a: dict[str, float] | None, b: dict[str, float] | None) -> str:
    if a is None or b is None or not b["median"]:
        return "-"
    return f"{a['median'] / b['median']:.2f}x"


# The variants guest-agent is compared with, in the table's ratio columns (those in the run).
REFERENCES = (("cloudinit", "cloud-init+waagent"), ("caa-chain", "CAA's chain"), ("floor-tuned", "floor-tuned"))


def table(summary: dict[str, Any], sizes: dict[str, float], variants: list[str]) -> str:
    refs = [(v, name) for v, name in REFERENCES if v in variants] if "guest-agent" in variants else []
    lines = figure_rows(summary, variants, "figure (seconds from QEMU start unless noted)", ROWS, refs)
    added = added_sizes(sizes)
    row = ["image: rootfs MiB (added over its floor: floor-tuned under the tuned variants, floor-stock elsewhere)"]
    row += [f"{sizes[v]:.1f} ({added[v]:+.1f})" if v in added else f"{sizes[v]:.1f}" for v in variants]
    for v, _ in refs:
        # (CAA's chain adds a few stand-in scripts where a CAA image has Go binaries: no ratio there.)
        ok = "guest-agent" in added and added.get(v, 0) >= 1
        row.append(f"{added['guest-agent'] / added[v]:.2f}x" if ok else "-")
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def figure_rows(
    summary: dict[str, Any],
    variants: list[str],
    what: str,
    rows: Sequence[tuple[str, str]],
    refs: list[tuple[str, str]],
) -> list[str]:
    """A markdown table's head and one row per figure some variant has: the medians (min-max) per
    variant, then guest-agent's ratio to each of `refs`."""
    head = [what] + [NAMES.get(v, v) for v in variants] + [f"guest-agent / {name}" for _, name in refs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label in rows:
        cells = [fmt_cell(summary[v].get(key)) for v in variants]
        if all(c == "-" for c in cells):
            continue
        cells += [ratio(summary["guest-agent"].get(key), summary[v].get(key)) for v, _ in refs]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return lines


def table_since_systemd(summary: dict[str, Any], variants: list[str]) -> str:
    """The milestones counted from systemd's start, and when systemd started."""
    labels = dict(ROWS)
    rows = [("systemd", "systemd started (seconds from QEMU start)")] + [(f"{k}_sys", labels[k]) for k in SINCE_SYSTEMD]
    return "\n".join(figure_rows(summary, variants, "figure (seconds from systemd's start)", rows, []))


def added_sizes(sizes: dict[str, float]) -> dict[str, float]:
    """MiB each variant adds to the floor it is built on (only where that floor was built too)."""
    return {v: round(sizes[v] - sizes[f], 1) for v, f in FLOOR_OF.items() if v in sizes and f in sizes}


# Pairs of variants that split a gain into the agent's own and the image tuning's, and show what the
# package route costs: (variant, against, what the pair shows).  Rows of table_splits().
SPLITS = (
    ("guest-agent", "caa-chain", "agent + tuning: guest-agent on the tuned image, CAA's chain on the stock one"),
    ("guest-agent", "caa-chain-tuned", "the agent's own gain: both on the tuned image"),
    ("caa-chain-tuned", "caa-chain", "the tuning, under CAA's chain"),
    ("floor-tuned", "floor-stock", "the tuning alone, no agent"),
    ("guest-agent", "floor-tuned", "what the agent (venv) adds to the tuned image"),
    ("guest-agent-deb", "floor-tuned", "what the agent (.deb) adds to the tuned image"),
    ("guest-agent-deb", "guest-agent", "the package route against the venv"),
)
SPLIT_FIGURES = (
    ("dhcp", "DHCP lease (s)"),
    ("ready", "Ready (s)"),
    ("apf", "APF listening (s)"),
    ("multi_user", "multi-user.target (s)"),
    ("cpu_s", "provisioning CPU (s)"),
    ("mem_peak_mib", "provisioning peak memory (MiB)"),
    ("used_after_boot_mib", "memory in use after boot (MiB)"),
    ("rootfs_mib", "rootfs (MiB)"),
)


def split_cell(a: dict[str, float] | None, b: dict[str, float] | None) -> str:
    """`a / b` of the medians and their difference: `0.59x (-4.9)`."""
    if a is None or b is None:
        return "-"
    d = a["median"] - b["median"]
    return f"{ratio(a, b)} ({d:+.1f})" if b["median"] else f"- ({d:+.1f})"


def table_splits(summary: dict[str, Any], sizes: dict[str, float], variants: list[str]) -> str:
    """One row per SPLITS pair whose two variants were in the run: each figure's ratio and difference
    of the medians (seconds from QEMU start, CPU seconds, MiB).  Empty when no pair was run."""
    head = ["pair: variant / against", "what it shows", *(label for _, label in SPLIT_FIGURES)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for a, b, what in SPLITS:
        if a not in variants or b not in variants:
            continue
        cells = []
        for key, _ in SPLIT_FIGURES:
            if key == "rootfs_mib":
                sa = {"median": sizes[a]} if a in sizes else None
                sb = {"median": sizes[b]} if b in sizes else None
                cells.append(split_cell(sa, sb))
            else:
                cells.append(split_cell(summary[a].get(key), summary[b].get(key)))
        lines.append("| " + " | ".join([f"{a} / {b}", what, *cells]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


# The goals of issue 12 (and issue 10's boot figures): (label, figure, how it is compared, limit).
# "ratio:<ref>" = guest-agent's median / ref's median; "over:<ref>" = guest-agent's median - ref's;
# "abs" = guest-agent's median.
GOALS = (
    ("Ready at the wireserver <= 0.6x cloud-init+waagent", "ready", "ratio:cloudinit", 0.6),
    ("Ready at the wireserver <= 0.6x CAA's chain", "ready", "ratio:caa-chain", 0.6),
    ("APF listening <= 0.4x cloud-init+waagent", "apf", "ratio:cloudinit", 0.4),
    ("APF listening <= 0.4x CAA's chain", "apf", "ratio:caa-chain", 0.4),
    ("multi-user.target <= floor-tuned's + 0.3 s", "multi_user", "over:floor-tuned", 0.3),
    ("DHCP lease no later than floor-tuned's", "dhcp", "over:floor-tuned", 0.0),
    ("DHCP lease -> Ready <= 0.15 s", "gap_dhcp_ready", "abs", 0.15),
)


def goals(summary: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Each goal with guest-agent's figure and whether it is met (None: a variant was not in the run)."""
    out: list[tuple[str, str, bool | None]] = []
    ga = summary.get("guest-agent", {})
    for label, key, how, limit in GOALS:
        mine = ga.get(key)
        how_kind, _, ref = how.partition(":")
        other = summary.get(ref, {}).get(key) if ref else None
        if mine is None or (ref and other is None):
            out.append((label, "not measured in this run", None))
        elif how_kind == "ratio":
            r = mine["median"] / other["median"]
            out.append((label, f"{r:.2f}x ({mine['median']:.2f} s / {other['median']:.2f} s)", r <= limit))
        elif how_kind == "over":
            d = mine["median"] - other["median"]
            out.append((label, f"{d:+.2f} s ({mine['median']:.2f} s vs {other['median']:.2f} s)", d <= limit))
        else:
            out.append((label, f"{mine['median']:.2f} s", mine["median"] <= limit))
    return out


def goals_text(summary: dict[str, Any]) -> str:
    mark = {True: "met", False: "NOT met", None: "-"}
    return "\n".join(f"- {label}: {value} -- {mark[ok]}" for label, value, ok in goals(summary))


def draw(summary: dict[str, Any], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, lbl) for k, lbl in (*MILESTONES, ("ready_waagent", "Ready sent by waagent"))]
    colours = ["#4C72B0", "#55A868", "#C44E52", "#8172B2", "#CCB974", "#64B5CD", "#8C8C8C"]
    fig, ax = plt.subplots(figsize=(10, 1.2 + 1.6 * len(variants)))
    yt, yl = [], []
    seen: set[str] = set()  # one legend entry per milestone
    h = 0.8 / len(keys)
    for i, v in enumerate(variants):
        base = len(variants) - 1 - i
        for j, (k, lbl) in enumerate(keys):
            s = summary[v].get(k)
            if s is None:
                continue
            y = base + 0.4 - (j + 0.5) * h
            ax.barh(y, s["median"], height=h * 0.9, color=colours[j], label=lbl if k not in seen else None)
            ax.errorbar(
                s["median"], y, xerr=[[s["median"] - s["min"]], [s["max"] - s["median"]]], fmt="none", ecolor="black",
                elinewidth=0.8, capsize=2,
            )  # fmt: skip
            ax.text(s["max"] + 0.3, y, f"{s['median']:.1f}", va="center", fontsize=7)
            seen.add(k)
        yt.append(base)
        yl.append(NAMES.get(v, v))
    ax.set_yticks(yt, yl)
    ax.set_xlabel("seconds from QEMU start (median, whiskers min-max; TCG, -m 1024 -smp 2)")
    ax.set_title("Boot timeline per variant: bars from QEMU start to each milestone")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles, strict=False))
    ax.legend(uniq.values(), uniq.keys(), loc="lower right", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, str]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory_gib": f"{int(mem) / 2**20:.1f}",
        "kernel": platform.release(),
        "os": platform.freedesktop_os_release().get("PRETTY_NAME", "")
        if hasattr(platform, "freedesktop_os_release")
        else "",
        "qemu": qemu,
    }


def write_docs(result: dict[str, Any], tbl: str, tbl_sys: str, tbl_splits: str, goal_lines: str, path: Path) -> None:
    m = result["machine"]
    body = f"""<!-- bench-boot:begin (written by `make bench-boot`, bench/boot/run.py; do not edit by hand) -->
## Boot benchmark: guest-agent vs cloud-init + waagent vs CAA's chain vs no agent

Run on {result["date"]}: {result["runs"]} boots of each variant, interleaved
({" ".join(result["order"][: len(result["variants"]) * 2])} ...), {result["total_s"] / 60:.1f} minutes
of boots in all (`make bench-boot` also (re)builds the variants' images first when their inputs changed).

The variants: *guest-agent* is the product, image/build.sh's tuned pod VM image (docs/image-tuning.md);
*guest-agent from the .deb* is the same tuned image with the agent installed from the project's
Debian package by apt (Debian 12's python3 3.11, python3-yaml, python3-h11, python3-pyroute2, the
package's units) instead of the venv; *floor-tuned* is that tuned image without the agent (the
difference is what the agent costs); *floor-stock* is the stock base without an agent (the base the
incumbents are installed on); *cloud-init + waagent* is Debian 12's cloud-init and waagent
configured as Debian's Azure images configure them, on the stock base; *CAA's chain* is CAA's pod VM
unit graph with stand-in programs for CAA's Go binaries, on the stock base (section "The CAA chain
variant" below), and *CAA's chain on the tuned image* the same on floor-tuned's tuning.
Machine: {m["cpu"]}, {m["cores"]} cores, {m["memory_gib"]} GiB, {m["os"]}, kernel {m["kernel"]}; {m["qemu"]}.
QEMU: TCG (no KVM here), `-m 1024 -smp 2 -cpu qemu64,+rdrand,-hypervisor` (RDRAND as on every cloud CPU: Debian's
kernel trusts it and has its random number generator seeded at once; docs/boot-placement.md), Azure SMBIOS, virtio
disk (qcow2 overlay per boot: every boot is a first boot), provisioning ISO on IDE CD-ROM, swtpm TPM, restricted
user networking in a private network namespace, fake IMDS / wireserver / HostGAPlugin (bench/boot/fabric.py).

Command: `{result["command"]}`

Median (min-max) of {result["runs"]} boots.  TCG figures are several times slower than a real VM:
compare the variants with each other, not with cloud numbers.

{tbl}

The same boots counted from systemd's start (init.scope's start, put on the host clock like the
rest): the kernel's and the initrd's share, which the host's load moves by seconds between boots,
taken out.

{tbl_sys}

What the tuning and the install route account for: each pair's ratio of the medians of the first
table and, in brackets, their difference (seconds, MiB).  guest-agent against CAA's chain on the
same tuned image is the agent's own gain; against CAA's chain on the stock image (the goals below)
it is the agent's and the tuning's together; floor-tuned against floor-stock is the tuning alone;
guest-agent from the .deb against guest-agent is what the package route costs.

{tbl_splits or "(no pair of the variants run)"}

Goals (issue 12; the lease rows are issue 10's), from the medians of the first table:

{goal_lines}

![boot timeline](boot-timeline.png)

How each figure is taken (bench/boot/run.py):
- *DHCP lease*: the first lease in the guest: systemd-networkd's journal line, or for cloud-init
  the ephemeral DHCP it runs itself in cloud-init-local (cloud-init.log), whichever is first.
- *user-data fetched*: host arrival of the first IMDS request answered with the user-data
  (guest-agent and CAA's process-user-data: `compute/userData`; cloud-init:
  `/metadata/instance?...&extended=true`, which it reads after the CustomData of the provisioning ISO).
- *config files written*: the last mtime of `/run/peerpod/{{apf.json,auth.json,initdata}}`.
- *Ready at the wireserver*: host arrival of the first accepted health report with state Ready
  (cloud-init sends one before waagent; "Ready sent by waagent" is waagent's own, later one).
- *APF listening*: the stand-in forwarder's `ActiveEnterTimestampMonotonic` (Type=notify, READY=1
  after listen()); in the cloud-init variant it is ordered after cloud-init.service (write_files), in
  CAA's chain it starts from CAA's `.path` chain (and setup-nat-for-imds's `Wants=`), after
  multi-user.target, so the report unit also waits (bounded) for APF before it measures.
- *multi-user.target*: its `ActiveEnterTimestampMonotonic`.
- Guest monotonic times are put on the host clock by `BENCH-SYNC` console lines stamped on arrival.
- *CPU time*: sum of systemd's `CPUUsageNSec` of the provisioning services (guest-agent.service;
  cloud-init-local, cloud-init, cloud-config, cloud-final and walinuxagent; CAA's process-user-data
  and azure-ready, whose stand-ins are Python, not CAA's Go), read once provisioning
  is over (after the variant's last Ready; waagent keeps running as a daemon, so its figure grows).
- *Peak memory*: Debian 12's systemd 252 has no `MemoryPeak` property, so each provisioning service
  runs in a slice of its own under `bench.slice` (a benchmark-only drop-in) and the kernel's
  `memory.peak` of `bench.slice` is read (it includes page cache the services faulted in).
- *Memory still held*: `memory.current` of `bench.slice` after provisioning; *in use after boot*:
  MemTotal - MemAvailable of the whole VM.
- *guest-agent process started* / *warm*: the agent's own timeline (`/run/guest-agent/timeline.json`,
  CLOCK_MONOTONIC): `process_start` and `agent_start` (interpreter start-up and imports done; the
  agent then waits for the route by netlink events).
- *Image size*: `du` of the root file system (without kernel and initrd) as each recipe leaves it:
  image/build.sh's manifest for guest-agent, image/variants/build-variant.sh for the others; the
  added size is over the floor the variant is built on.
<!-- bench-boot:end -->
"""
    if path.exists():
        old = path.read_text()
        if "<!-- bench-boot:begin" in old:
            pre = old.split("<!-- bench-boot:begin", 1)[0]
            post = old.split("<!-- bench-boot:end -->", 1)[1] if "<!-- bench-boot:end -->" in old else ""
            path.write_text(pre + body + post.lstrip("\n"))
            return
        path.write_text(old.rstrip("\n") + "\n\n" + body)
        return
    path.write_text("# Benchmarks\n\n" + body)


def inner(args: argparse.Namespace) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    variants = args.variants.split(",")
    for v in variants:
        if not (VARIANTS_DIR / "build" / v / "disk.raw").exists():
            log(f"no image for {v}: run image/variants/build-variant.sh {v}")
            return 1
    work = Path(tempfile.mkdtemp(prefix="bootbench-"))
    log(f"work directory {work}")
    order = [v for _ in range(args.runs) for v in variants]
    t_start = time.time()
    boots: list[Boot] = []
    discarded: list[Boot] = []  # boots during which another QEMU ran (not in the figures)
    for i, v in enumerate(order):
        rnd = i // len(variants)
        for attempt in range(args.retries + 1):
            b = boot(v, rnd, work / f"try{attempt}", args.timeout)
            if not b.contended:
                break
            log(f"boot {i + 1}/{len(order)} {v}: another QEMU ran meanwhile (pids {b.contended}); measured again")
            discarded.append(b)
        boots.append(b)
        fig = ", ".join(f"{k}={b.figures.get(k)}" for k, _ in MILESTONES)
        log(f"boot {i + 1}/{len(order)} {v}: {b.wall_s:.1f} s{' ERROR ' + b.error if b.error else ''}; {fig}")
    total = time.time() - t_start
    summary = summarise(boots, variants)
    sizes = image_sizes(variants)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)),
        "command": args.command,
        "runs": args.runs,
        "variants": variants,
        "order": order,
        "total_s": round(total, 1),
        "machine": machine(),
        "image_rootfs_mib": sizes,
        "image_added_over_floor_mib": added_sizes(sizes),
        "summary": summary,
        "goals": [{"goal": g, "value": v, "met": ok} for g, v, ok in goals(summary)],
        "boots": [
            {
                "variant": b.variant,
                "round": b.round,
                "wall_s": round(b.wall_s, 1),
                "error": b.error,
                "figures": b.figures,
                "system_state": (b.doc or {}).get("system_state"),
                "settled": (b.doc or {}).get("settled"),
                "analyze": (b.doc or {}).get("analyze", "").strip(),
                "failed": (b.doc or {}).get("failed", "").strip(),
            }
            for b in boots
        ],
        "discarded_contended_boots": [
            {"variant": b.variant, "round": b.round, "other_qemu_pids": b.contended} for b in discarded
        ],
        "contended_boots_kept": sum(1 for b in boots if b.contended),
    }
    tbl = table(summary, sizes, variants)
    tbl_sys = table_since_systemd(summary, variants)
    tbl_splits = table_splits(summary, sizes, variants)
    print(tbl + "\n\n" + tbl_sys + ("\n\n" + tbl_splits if tbl_splits else ""))
    print("\nGoals (medians):\n" + goals_text(summary))
    print(f"\ntotal {total / 60:.1f} min; per-boot artefacts in {work}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bootbench.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_docs:
        draw(summary, variants, out / "boot-timeline.png")
        write_docs(result, tbl, tbl_sys, tbl_splits, goals_text(summary), out / "benchmarks.md")
    bad = [b for b in boots if b.error]
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.boot.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="boots of each variant (default 3)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--timeout", type=float, default=240.0, help="per boot, seconds")
    ap.add_argument("--retries", type=int, default=2, help="re-measure a boot when another QEMU ran meanwhile")
    ap.add_argument("--out", default=str(DOCS), help="where bootbench.json (and the docs) go")
    ap.add_argument("--no-docs", action="store_true", help="write only the JSON, not the PNG and benchmarks.md")
    ap.add_argument("--command", default="make bench-boot", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench-boot needs root (unshare --net, QEMU, swtpm)", file=sys.stderr)
        return 2
    for tool in ("qemu-system-x86_64", "qemu-img", "swtpm", "socat", "genisoimage", "unshare", "ip"):
        if shutil.which(tool) is None:
            print(f"bench-boot: missing tool {tool}", file=sys.stderr)
            return 2
    if os.environ.get("BOOTBENCH_NETNS") != "1":
        # Everything (fakes, relays, QEMU) in a network namespace of its own with only lo.
        env = {**os.environ, "BOOTBENCH_NETNS": "1"}
        return subprocess.call(["unshare", "--net", "--", sys.executable, "-m", "bench.boot.run", *sys.argv[1:]],
                               env=env, cwd=REPO)  # fmt: skip
    return inner(args)


if __name__ == "__main__":
    sys.exit(main())
