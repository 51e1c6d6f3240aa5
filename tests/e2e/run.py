"""End-to-end: boot the pod VM image under QEMU against a fake Azure and check what it did.

    sudo .venv/bin/python tests/e2e/run.py [--boots valid,invalid,cidata,...] [--keep]   (BOOTS below)

`caa` and `byom` boot the CAA-layout images (image/variants/build-variant.sh caa|caa-sftp): CAA's
pod VM unit graph with stand-in binaries that record when they ran and what they saw, and
guest-agent installed into it as an image builder would.  `byom` delivers user-data the way CAA's
byom provider does, by an upload into the /media/cidata tmpfs some seconds after boot (a test unit
in the guest plays the SFTP client; the bytes come from a second disk).  `openstack` boots with
Nova's DMI strings and a `config-2` config drive as Nova builds it, and no metadata service;
`openstack-metadata` with the same DMI and the fake Nova metadata service instead.  `caa-deb` and
`byom-early-deb` boot the CAA layouts built from Debian 13 with the agent's Debian package
installed by apt (build-variant.sh caa-deb|caa-sftp-deb).

Everything runs inside a private network namespace holding only `lo` (the script re-executes
itself under `unshare --net`): the fake IMDS and wireserver on 127.0.0.1, swtpm, QEMU with
`-netdev user,restrict=on` whose guestfwd rules relay the guest's 169.254.169.254:80 and
168.63.129.16:80 to them through socat.  Nothing the guest does can reach a real address.

Results come out of the guest through a test-only unit (e2e-dump.service, pulled in by
`systemd.wants=` on the kernel command line) that writes one checksummed document to a second
serial port once boot has finished, then waits; meanwhile the harness probes the stand-in APF
through hostfwd and stops QEMU.  Guest monotonic times are mapped onto the host clock with the
E2E-SYNC lines the unit prints on the console.  Every wait is bounded; every process is killed
on exit.  Exit status 0 when every check passed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.e2e import guest, userdata  # noqa: E402
from tests.fakecloud import configdrive  # noqa: E402

IMAGE_DIR = REPO / "image" / "build"
VARIANTS_DIR = REPO / "image" / "variants" / "build"
APF_PORT = 15150
HOSTFWD_PORT = 15150  # on 127.0.0.1 inside the private netns: nothing else can be there
AZURE_SMBIOS = [
    "type=1,manufacturer=Microsoft Corporation,product=Virtual Machine,version=Hyper-V UEFI Release v4.1",
    "type=3,manufacturer=Microsoft Corporation,asset=7783-7084-3265-9085-8269-3286-77",
]
# What Nova's libvirt driver puts in SMBIOS type 1 (nova/virt/libvirt/driver.py, _get_guest_config_sysinfo).
OPENSTACK_SMBIOS = [
    "type=1,manufacturer=OpenStack Foundation,product=OpenStack Nova,version=29.0.1,family=Virtual Machine",
]
BOOTS = (
    "valid",
    "invalid",
    "cidata",
    "cidata-cdrom",
    "caa",
    "byom",
    "byom-early",
    "openstack",
    "openstack-metadata",
    "caa-deb",
    "byom-early-deb",
)
BOOT_TIMEOUT_S = 300.0  # QEMU start to dump received; a TCG boot takes 20-40 s


def log(msg: str) -> None:
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- processes


class Procs:
    """Child processes, each killed (process group) on exit whatever happens."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)

    def close(self) -> None:
        for _, p in reversed(self.procs):
            self.stop(p)


def wait_for_path(path: Path, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > end:
            raise TimeoutError(f"{path} did not appear in {timeout_s} s")
        time.sleep(0.02)


# ----------------------------------------------------------------------------- one boot


@dataclass
class Scenario:
    name: str
    user_data: bytes
    expected: userdata.Expected | None  # None: provisioning must fail
    azure: bool = True  # fake IMDS + wireserver + Azure DMI; else QEMU's DMI and a cidata ISO (or delivery disk)
    # How the cidata ISO is attached: "virtio" (virtio_blk, loaded by the initrd), or "cdrom" on the
    # IDE controller, whose drivers (ata_piix, sr_mod) udev's coldplug loads after the agent started.
    cidata_drive: str = "virtio"
    layout: str = "own"  # "own": image/build; "caa" / "byom": the CAA-layout variants
    # The CAA-layout image booted: the layout's pip-installed one (caa, caa-sftp), or the Debian
    # package images built from trixie (caa-deb, caa-sftp-deb).
    variant: str = ""
    wants: tuple[str, ...] = ()  # test-only guest units pulled in by systemd.wants=
    probes: str = ""  # e2e-dump probes asked for on the kernel command line
    # e2e-dump waits for these stand-in units to be failed, or active with their process's record
    settle: tuple[str, ...] = ()
    # OpenStack (azure=False, Nova's DMI): "config-drive" attaches a config-2 ISO and serves no
    # metadata; "metadata" serves the fake Nova at 169.254.169.254 and attaches no drive.
    openstack: str = ""

    def image(self, default: Path) -> Path:
        if self.variant:
            return VARIANTS_DIR / self.variant
        return {"caa": VARIANTS_DIR / "caa", "byom": VARIANTS_DIR / "caa-sftp"}.get(self.layout, default)


@dataclass
class BootResult:
    scenario: Scenario
    workdir: Path
    qemu_rc: int | None = None
    console: list[guest.ConsoleLine] = field(default_factory=list)
    dump: dict[str, Any] | None = None
    server_log: list[dict[str, Any]] = field(default_factory=list)
    t0_wall: float = 0.0  # time.time() just before QEMU started
    t_dump: float | None = None  # host seconds since QEMU start when the dump was complete
    apf_banner: str | None = None
    apf_error: str | None = None
    wall_s: float = 0.0


def make_cidata(workdir: Path, user_data: bytes) -> Path:
    src = workdir / "cidata"
    src.mkdir()
    (src / "user-data").write_bytes(user_data)
    (src / "meta-data").write_text("instance-id: e2e-cidata\nlocal-hostname: podvm\n")
    iso = workdir / "seed.iso"
    subprocess.run(
        ["genisoimage", "-quiet", "-o", str(iso), "-V", "cidata", "-J", "-r", str(src)], check=True, timeout=30
    )
    return iso


def make_config_drive(workdir: Path, user_data: bytes) -> Path:
    """A config drive as Nova writes it (tests/fakecloud/configdrive.py), by genisoimage."""
    src = configdrive.tree(workdir / "config-drive", user_data)
    iso = workdir / "config-2.iso"
    subprocess.run(
        ["genisoimage", "-quiet", "-o", str(iso), *configdrive.GENISOIMAGE_ARGS, str(src)], check=True, timeout=30
    )
    return iso


def start_fakecloud(procs: Procs, workdir: Path, cloud: str, user_data: bytes, server_log: Path) -> dict[str, int]:
    """tests.fakecloud for `cloud` on 127.0.0.1; its ports."""
    ud = workdir / "user-data"
    ud.write_bytes(user_data)
    fake = procs.start(
        "fakecloud",
        [sys.executable, "-m", "tests.fakecloud", "--cloud", cloud, "--user-data", str(ud), "--log", str(server_log)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=(workdir / "fakecloud.err").open("wb"),
    )
    ports: dict[str, int] = json.loads(_readline(fake, 15.0))
    return ports


def make_delivery_disk(workdir: Path, user_data: bytes) -> Path:
    """A raw disk holding `E2E-USERDATA <length>\n` and the bytes, for e2e-sftp-delivery.service."""
    blob = b"E2E-USERDATA %d\n" % len(user_data) + user_data
    disk = workdir / "delivery.img"
    disk.write_bytes(blob + b"\0" * (-len(blob) % 4096))
    return disk


def read_console(p: subprocess.Popen[bytes], t0: float, out: list[guest.ConsoleLine], raw: Path) -> None:
    assert p.stdout is not None
    with raw.open("w", encoding="utf-8") as f:
        for bline in p.stdout:
            t = time.monotonic() - t0
            text = bline.decode("utf-8", "replace").rstrip("\r\n")
            out.append(guest.ConsoleLine(t, text))
            f.write(f"{t:9.3f} {text}\n")
            f.flush()


def probe_apf(port: int, timeout_s: float = 10.0) -> tuple[str | None, str | None]:
    """The stand-in APF's one-line banner through hostfwd.  slirp accepts the host connection even
    when nothing listens in the guest (then closes it), so only the banner proves APF answered."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.settimeout(timeout_s)
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(256)
                if not chunk:
                    break
                data += chunk
        return (data.decode("utf-8", "replace").strip() or None), (None if data else "closed without a banner")
    except OSError as e:
        return None, repr(e)


def boot(sc: Scenario, workdir: Path, procs: Procs, args: argparse.Namespace) -> BootResult:
    res = BootResult(sc, workdir)
    image = sc.image(Path(args.image).resolve())
    wall0 = time.monotonic()
    workdir.mkdir(parents=True)
    netdev = "user,id=n0,restrict=on,ipv6=off,net=168.0.0.0/7,host=168.0.0.1,dhcpstart=168.0.0.4,dns=168.0.0.2"
    qemu_extra: list[str] = []
    server_log = workdir / "servers.jsonl"
    if sc.azure:
        ports = start_fakecloud(procs, workdir, "azure", sc.user_data, server_log)
        # guestfwd: every guest connection to these addresses gets its own socat to the fake.
        for addr, port in (("169.254.169.254", ports["imds_port"]), ("168.63.129.16", ports["wireserver_port"])):
            netdev += f",guestfwd=tcp:{addr}:80-cmd:socat - TCP:127.0.0.1:{port}"
        for s in AZURE_SMBIOS:
            qemu_extra += ["-smbios", s]
        qemu_extra += ["-uuid", str(uuid.uuid4())]
    elif sc.openstack:
        if sc.openstack == "metadata":
            ports = start_fakecloud(procs, workdir, "openstack", sc.user_data, server_log)
            netdev += f",guestfwd=tcp:169.254.169.254:80-cmd:socat - TCP:127.0.0.1:{ports['imds_port']}"
        else:
            iso = make_config_drive(workdir, sc.user_data)
            qemu_extra += ["-drive", f"file={iso},if=virtio,format=raw,readonly=on"]
        for s in OPENSTACK_SMBIOS:
            qemu_extra += ["-smbios", s]
        qemu_extra += ["-uuid", str(uuid.uuid4())]
    elif sc.layout == "byom":
        disk = make_delivery_disk(workdir, sc.user_data)
        qemu_extra += ["-drive", f"file={disk},if=virtio,format=raw,readonly=on"]
    else:
        iso = make_cidata(workdir, sc.user_data)
        iface = "if=ide,media=cdrom" if sc.cidata_drive == "cdrom" else "if=virtio"
        qemu_extra += ["-drive", f"file={iso},{iface},format=raw,readonly=on"]
    netdev += f",hostfwd=tcp:127.0.0.1:{HOSTFWD_PORT}-:{APF_PORT}"

    tpm_dir = workdir / "tpm"
    tpm_dir.mkdir()
    tpm_sock = workdir / "swtpm.sock"
    procs.start(
        "swtpm",
        ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={tpm_dir}", "--ctrl", f"type=unixio,path={tpm_sock}",
         "--terminate", "--log", f"file={workdir / 'swtpm.log'}"],
    )  # fmt: skip
    wait_for_path(tpm_sock, 10.0)

    overlay = workdir / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image / "disk.raw"), str(overlay)],
        check=True,
        timeout=30,
    )
    cmdline = (image / "cmdline").read_text().strip()
    cmdline += " systemd.wants=e2e-dump.service e2e.hold=120"
    cmdline += "".join(f" systemd.wants={u}" for u in sc.wants)
    if sc.settle:
        cmdline += f" e2e.settle={','.join(sc.settle)}"
    if sc.probes and not args.no_probes:
        cmdline += f" {sc.probes}"
    ttys1 = workdir / "ttyS1.log"
    argv = [
        # QEMU's default CPU (qemu64) has no RDRAND, unlike the boot benchmark's: the kernel's CRNG is
        # seeded only seconds into userspace, so these boots also cover an agent that must not wait
        # for it (guest_agent/entropy.py) and whose interpreter start-up does (docs/boot-placement.md).
        "qemu-system-x86_64", "-accel", "tcg", "-m", "1024", "-smp", "2",
        "-nodefaults", "-display", "none", "-no-reboot",
        "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"), "-append", cmdline,
        "-drive", f"file={overlay},if=virtio,format=qcow2",
        "-netdev", netdev, "-device", "virtio-net-pci,netdev=n0",
        "-chardev", f"socket,id=chrtpm,path={tpm_sock}", "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
        "-device", "tpm-tis,tpmdev=tpm0",
        "-serial", "stdio", "-serial", f"file:{ttys1}",
        *qemu_extra,
    ]  # fmt: skip
    (workdir / "qemu.argv").write_text(json.dumps(argv, indent=1))
    res.t0_wall = time.time()
    t0 = time.monotonic()
    qemu = procs.start(
        "qemu", argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=(workdir / "qemu.err").open("wb")
    )
    reader = threading.Thread(target=read_console, args=(qemu, t0, res.console, workdir / "console.log"), daemon=True)
    reader.start()

    deadline = t0 + args.timeout
    while time.monotonic() < deadline and qemu.poll() is None:
        if ttys1.exists():
            res.dump = guest.parse_dump(ttys1.read_text(errors="replace"))
            if res.dump is not None:
                res.t_dump = time.monotonic() - t0
                break
        time.sleep(0.2)
    if res.dump is None:
        log(f"{sc.name}: no dump from the guest (QEMU {'exited' if qemu.poll() is not None else 'timed out'})")
    else:
        res.apf_banner, res.apf_error = probe_apf(HOSTFWD_PORT)
    res.qemu_rc = qemu.poll()
    procs.stop(qemu)
    reader.join(5)
    if res.dump is None:
        log(f"{sc.name}: {guest.stall_summary(res.console)}")
    for name, p in procs.procs:
        if name == "fakecloud":
            procs.stop(p)
    if server_log.exists():
        res.server_log = [json.loads(x) for x in server_log.read_text().splitlines() if x.strip()]
    res.wall_s = time.monotonic() - wall0
    return res


def _readline(p: subprocess.Popen[bytes], timeout_s: float) -> str:
    assert p.stdout is not None
    box: list[bytes] = []
    t = threading.Thread(target=lambda: box.append(p.stdout.readline() if p.stdout else b""), daemon=True)
    t.start()
    t.join(timeout_s)
    if not box or not box[0]:
        raise RuntimeError(f"no ports line from the fake cloud within {timeout_s} s (exit {p.poll()})")
    return box[0].decode()


# ----------------------------------------------------------------------------- checks


class Checks:
    def __init__(self, name: str) -> None:
        self.name = name
        self.results: list[tuple[bool, str]] = []

    def check(self, ok: bool, what: str, detail: object = "") -> bool:
        self.results.append((bool(ok), what if ok else f"{what}: {detail}"))
        return bool(ok)

    @property
    def failed(self) -> list[str]:
        return [w for ok, w in self.results if not ok]


def figures(res: BootResult) -> dict[str, float | None]:
    """Seconds from QEMU start: guest monotonic times shifted by the measured clock offset,
    host-side events (fake server log) relative to the stamp taken just before QEMU started."""
    d = res.dump or {}
    off = guest.clock_offset(res.console)
    units = d.get("units", {})

    def g(mono: float | None) -> float | None:
        return None if mono is None or off is None else round(mono + off, 2)

    def host(t: float | None) -> float | None:
        return None if t is None else round(t - res.t0_wall, 2)

    tl = d.get("timeline", {})
    imds = [e["t"] for e in res.server_log if e.get("server") == "imds" and e.get("status") == 200]
    ready = [t for t, state, _ in guest.health_reports(res.server_log) if state == "Ready"]
    return {
        "dhcp_lease": g(guest.dhcp_lease_mono(d.get("journal", {}).get("networkd", []))),
        "agent_process_start": g(tl.get("process_start") if isinstance(tl, dict) else None),
        "user_data_fetched(guest)": g(guest.stage_end(tl, "fetch")),
        "user_data_served(host)": host(imds[0] if imds else None),
        "READY=1": g(guest.usec(units.get("guest-agent.service", {}), "ActiveEnterTimestampMonotonic")),
        "Ready_received(host)": host(ready[0] if ready else None),
        "kata-agent_active": g(guest.usec(units.get("kata-agent.service", {}), "ActiveEnterTimestampMonotonic")),
        "APF_listening": g(
            guest.usec(units.get("agent-protocol-forwarder.service", {}), "ActiveEnterTimestampMonotonic")
        ),
        "multi-user.target": g(guest.usec(units.get("multi-user.target", {}), "ActiveEnterTimestampMonotonic")),
        "dump_complete(host)": None if res.t_dump is None else round(res.t_dump, 2),
    }


def check_boot(res: BootResult) -> Checks:
    sc = res.scenario
    c = Checks(sc.name)
    d = res.dump
    if not c.check(
        d is not None, "guest dump received", f"{guest.stall_summary(res.console)}; see {res.workdir}/console.log"
    ):
        return c
    assert d is not None
    units = d["units"]
    ga, apf = units["guest-agent.service"], units["agent-protocol-forwarder.service"]
    fig = figures(res)
    reports = guest.health_reports(res.server_log)
    states = [s for _, s, _ in reports]

    if sc.expected is not None:
        exp = sc.expected
        c.check(ga.get("ActiveState") == "active" and ga.get("Result") == "success", "guest-agent active", ga)
        c.check(ga.get("NRestarts") == "0", "guest-agent not restarted", ga.get("NRestarts"))
        pp = d["peerpod"]
        for name, content in sorted(exp.files.items()):
            ent = pp.get(name)
            want = hashlib.sha256(content).hexdigest()
            c.check(ent is not None and ent.get("sha256") == want, f"/run/peerpod/{name} content", ent)
            # initdata.digest is public (it is what PCR 8 measures): the agent writes it 0644.
            mode = "0o644" if name == "initdata.digest" else "0o600"
            c.check(
                ent is not None and ent.get("mode") == mode, f"/run/peerpod/{name} mode {mode[2:]}", ent and ent["mode"]
            )
        extra = sorted(set(pp) - set(exp.files) - {".", ".."})
        c.check(not extra, "no other files in /run/peerpod", extra)
        digest = base64.b64decode(pp.get("initdata.digest", {}).get("b64", "")).decode()
        c.check(digest == exp.initdata_digest, "initdata.digest", digest)
        pcr = guest.pcr_value(d["pcr8"]["out"])
        c.check(pcr == exp.pcr8, "PCR 8 = sha256(zero32 || digest[:32])", f"{pcr} != {exp.pcr8} ({d['pcr8']})")
        c.check(apf.get("ActiveState") == "active", "APF active", apf)
        c.check(
            res.apf_banner == f"agent-protocol-forwarder stand-in pod={exp.pod}",
            "APF answers on 15150 through hostfwd",
            res.apf_banner or res.apf_error,
        )
        podns = d["netns"]["podns_lo"]
        c.check(podns["rc"] == 0 and "UP" in podns["out"], "podns usable from the host mount namespace, lo up", podns)
        nsu = units.get("netns@podns.service", {})
        c.check(nsu.get("ActiveState") == "active", "podns made by netns@podns.service", nsu)
        if "nat_probe" in d:
            np = d["nat_probe"]
            c.check(
                np["before"].get("SubState") == "running",
                "guest-agent-imds-nat waits for the pod address without holding up boot",
                np["before"],
            )
            c.check(
                np["after"].get("SubState") == "exited" and np["after"].get("Result") == "success",
                "guest-agent-imds-nat set up the NAT once the pod had an address, exit 0",
                np["after"],
            )
            c.check(np["get"].get("status") == 200, "the pod reaches IMDS through the NAT (HTTP 200)", np)
        if "netns_probe" in d:
            pr = d["netns_probe"]
            c.check(
                pr["unit_sandbox"]["propagates"] and pr["unit_sandbox"]["lo_up"],
                "netns made by netns@.service's commands under its sandbox is visible to the host, lo up",
                pr["unit_sandbox"],
            )
            c.check(
                not pr["protect_system"]["propagates"],
                "(control) netns made under ProtectSystem=strict is not visible to the host",
                pr["protect_system"],
            )
        if "restart_probe" in d:
            rp = d["restart_probe"]
            c.check(
                rp["wanted"]["e2e-dep-w"].get("ActiveState") == "active",
                "a dependent wanted by a unit that failed once and restarted gets started (guest-agent Wants= APF)",
                rp,
            )
            c.check(
                rp["control"]["e2e-dep-c"].get("ActiveState") != "active",
                "(control) without that Wants=, the dependent stays failed after the restart",
                rp,
            )
        applied = [ln.text for ln in res.console if "user-data applied; READY=1 sent" in ln.text]
        c.check(bool(applied), "the serial console shows the outcome (user-data applied)", applied)
        mu = fig["multi-user.target"]
        ready1 = fig["READY=1"]
        c.check(ready1 is not None and mu is not None and ready1 <= mu, "READY=1 before multi-user.target", fig)
        if sc.azure:
            c.check(states[:1] == ["Ready"] and "NotReady" not in states, "wireserver received Ready", states)
            rr = fig["Ready_received(host)"]
            c.check(rr is not None and mu is not None and rr <= mu, "Ready received before multi-user.target", fig)
            fields = guest.structured_fields(d["journal"]["guest-agent"])
            want_fields = {"GUEST_AGENT_STAGE", "GUEST_AGENT_ELAPSED_MS", "GUEST_AGENT_PROVIDER", "MESSAGE_ID"}
            c.check(want_fields <= fields, "journal has the structured fields", sorted(fields))
        if sc.openstack:
            check_openstack(c, res)
    else:
        c.check(ga.get("ExecMainStatus") == "78", "guest-agent exits 78 (invalid user-data)", ga)
        c.check(ga.get("NRestarts") == "0", "guest-agent not restarted after 78", ga.get("NRestarts"))
        c.check(apf.get("ActiveEnterTimestampMonotonic", "0") == "0", "APF never started", apf)
        nat = units.get("guest-agent-imds-nat.service", {})
        c.check(nat.get("ExecMainStartTimestampMonotonic", "0") == "0", "the IMDS NAT unit never started", nat)
        c.check(res.apf_banner is None, "nothing answers on 15150", res.apf_banner)
        # A VM nobody can log in to: the reason must be on the serial console, and journalctl -x explains it.
        failed = [ln.text for ln in res.console if "provisioning failed:" in ln.text]
        c.check(any("runcmd" in t for t in failed), "the serial console shows the failure with its reason", failed)
        c.check(
            "Subject: Pod VM provisioning failed" in d.get("explained", ""),
            "journalctl -x explains the failure (catalog installed and compiled)",
            d.get("explained", "")[-400:],
        )
        if sc.azure:
            not_ready = [b for _, s, b in reports if s == "NotReady"]
            c.check(bool(not_ready) and "Ready" not in states, "wireserver received NotReady, never Ready", states)
            c.check(any("runcmd" in b for b in not_ready), "NotReady names the reason (runcmd)", not_ready[:1])
        pp = d["peerpod"]
        c.check("apf.json" not in pp, "no apf.json written from invalid user-data", sorted(pp))
    if sc.azure or sc.openstack == "metadata":
        # Every request the guest made went to the fake services (the only guestfwd targets);
        # with restrict=on in a netns holding only lo there is nowhere else to go.
        other = [e for e in res.server_log if e.get("server") not in ("imds", "wireserver")]
        c.check(not other, "guest traffic only to the fake IMDS and wireserver", other)
    if sc.layout in ("caa", "byom") and sc.expected is not None:
        check_caa_graph(c, res, sc.expected)
    if sc.layout == "byom" and sc.expected is not None:
        check_byom_delivery(c, res)
    return c


def check_openstack(c: Checks, res: BootResult) -> None:
    """Detected from Nova's DMI, and provisioned from the source the scenario offered."""
    d = res.dump or {}
    messages = [str(e.get("MESSAGE", "")) for e in d["journal"]["guest-agent"]]
    c.check("provider openstack (detected from DMI)" in messages, "provider openstack detected from DMI", messages[:3])
    paths = [e.get("path") for e in res.server_log if e.get("server") == "imds"]
    if res.scenario.openstack == "config-drive":
        found = [m for m in messages if m.startswith("found the config drive")]
        c.check(bool(found), "user-data read from the config drive", messages[:8])
    else:
        c.check("/openstack/latest/user_data" in paths, "user-data fetched from the fake Nova metadata service", paths)


# CAA's chain of path units (AA -> CDH -> kata-agent, api-server-rest) may still be starting
# services when boot is finished: e2e-dump waits for its last units' records.  (AA's and CDH's are
# written before the sockets that start the next units; these two, Type=simple, are active before
# their stand-in has written anything.)
CAA_SETTLE = ("kata-agent.service", "api-server-rest.service")

# What guest-agent replaces in CAA's graph: (unit, its stand-in's name).  None of them may run.
REPLACED = (
    ("process-user-data.service", "process-user-data"),
    ("azure-ready.service", "azure-ready"),
    ("setup-nat-for-imds.service", "setup-nat-for-imds.sh"),
    ("afterburn-checkin.service", "afterburn"),  # CAA's preset + override, where afterburn exists
)


def check_caa_graph(c: Checks, res: BootResult, exp: userdata.Expected) -> None:
    """CAA's pod VM units around guest-agent, from the stand-ins' records (CAA-layout images)."""
    d = res.dump or {}
    units, rec = d["units"], d.get("standins", {})
    podns = d["netns"].get("podns_inode")
    ready1 = guest.usec(units["guest-agent.service"], "ActiveEnterTimestampMonotonic")

    def one(name: str) -> dict[str, Any]:
        r = rec.get(name, [])
        return r[0] if len(r) == 1 else {}

    ka = one("kata-agent")
    c.check(
        units["kata-agent.service"].get("ActiveState") == "active" and bool(ka),
        "kata-agent active (path-started, once)",
        (units["kata-agent.service"], rec.get("kata-agent"), d.get("settled")),
    )
    c.check(
        podns is not None and ka.get("podns") == podns,
        "kata-agent started with podns in place",
        (ka.get("podns"), podns),
    )
    c.check(
        ka.get("policy", {}).get("sha256") == hashlib.sha256(exp.files["policy.rego"]).hexdigest(),
        "kata-agent's default policy is initdata's policy.rego",
        ka.get("policy"),
    )
    asr = one("api-server-rest")
    c.check(
        units["api-server-rest.service"].get("ActiveState") == "active"
        and podns is not None
        and asr.get("netns") == podns,
        "api-server-rest active inside podns",
        (units["api-server-rest.service"], rec.get("api-server-rest"), podns, d.get("settled")),
    )
    aa = one("attestation-agent")
    c.check(bool(aa), "attestation-agent started once", rec.get("attestation-agent"))
    c.check(
        guest.pcr_value(aa.get("pcr8", {}).get("out", "")) == exp.pcr8,
        "attestation-agent saw PCR 8 extended exactly once with initdata",
        aa.get("pcr8"),
    )
    c.check(
        aa.get("initdata_digest", {}).get("sha256") == hashlib.sha256(exp.initdata_digest.encode()).hexdigest(),
        "attestation-agent saw initdata.digest",
        aa.get("initdata_digest"),
    )
    cdh = one("confidential-data-hub")
    c.check(
        cdh.get("config", {}).get("sha256") == hashlib.sha256(exp.files["cdh.toml"]).hexdigest()
        and cdh.get("auth", {}).get("sha256") == hashlib.sha256(exp.files["auth.json"]).hexdigest(),
        "confidential-data-hub started with cdh.toml and the user-data's auth.json",
        cdh,
    )
    for name, r in (("attestation-agent", aa), ("confidential-data-hub", cdh)):
        c.check(
            ready1 is not None and r.get("mono", 0) >= ready1,
            f"{name} started after guest-agent's READY=1",
            (r.get("mono"), ready1),
        )
    for unit, standin in REPLACED:
        u = units[unit]
        c.check(
            standin not in rec and guest.usec(u, "ExecMainStartTimestampMonotonic") is None,
            f"{unit} never ran",
            (rec.get(standin), u),
        )
    # Enabled the way CAA enables them, each got a start job; a Condition must have stopped it.
    for unit, _ in REPLACED:
        if res.scenario.layout == "byom" and unit == "process-user-data.service":
            unit = "process-user-data.path"  # what the SFTP profile enables instead of the service
        c.check(units[unit].get("ConditionResult") == "no", f"{unit} skipped by its condition", units[unit])
    failed = d.get("failed", "").strip()
    c.check(not failed, "no failed units", failed)
    if res.scenario.azure:
        ready = [s for _, s, _ in guest.health_reports(res.server_log)]
        c.check(ready == ["Ready"], "exactly one health report (Ready)", ready)


def check_byom_delivery(c: Checks, res: BootResult) -> None:
    """The agent waited for CAA's SFTP upload to be closed (no restarts) and provisioned the
    complete file: uploaded once the agent waits (byom), or under way before it starts (byom-early)."""
    d = res.dump or {}
    units = d["units"]
    dl = (d.get("standins", {}).get("e2e-sftp-delivery") or [{}])[0]
    ga = units["guest-agent.service"]
    c.check(d.get("cidata_mount") == "tmpfs", "/media/cidata is a tmpfs (media-cidata.mount)", d.get("cidata_mount"))
    start = guest.usec(ga, "ExecMainStartTimestampMonotonic")
    ready1 = guest.usec(ga, "ActiveEnterTimestampMonotonic")
    writes = dl.get("write_mono") or [float("inf")]
    if dl.get("mode") == "early":
        c.check(
            dl.get("agent_looked") is True and start is not None and writes[0] < start < dl.get("close_mono", 0),
            "guest-agent started (and looked) while the upload was under way",
            (writes, start, dl.get("close_mono")),
        )
    else:
        c.check(
            dl.get("agent_waiting") is True and start is not None and start < dl.get("open_mono", 0),
            "user-data uploaded in pieces once guest-agent said it waits",
            (start, dl),
        )
    c.check(
        len(writes) > 1 and ready1 is not None and ready1 >= dl.get("close_mono", float("inf")),
        "guest-agent provisioned only after the upload was closed",
        (ready1, dl.get("close_mono")),
    )


# ----------------------------------------------------------------------------- main


def byom(name: str, delivery_unit: str, variant: str = "") -> Scenario:
    ud, exp = userdata.valid(f"nginx-{name}")
    return Scenario(
        name, ud, exp, azure=False, layout="byom", variant=variant, wants=(delivery_unit,), settle=CAA_SETTLE
    )


def scenarios(names: list[str]) -> list[Scenario]:
    ud, exp = userdata.valid()
    all_ = {
        "valid": Scenario("valid", ud, exp, probes="e2e.netns_probe=1 e2e.restart_probe=1 e2e.nat_probe=1"),
        "invalid": Scenario("invalid", userdata.invalid(), None),
        "cidata": Scenario("cidata", *userdata.valid("nginx-cidata"), azure=False),
        # The ISO behind drivers that udev loads later: the agent's device cgroup allows disks by
        # type (DeviceAllow=block-* r), so it reads /dev/sr0 although sr_mod was not loaded when
        # the unit started.
        "cidata-cdrom": Scenario(
            "cidata-cdrom", *userdata.valid("nginx-cidata-cdrom"), azure=False, cidata_drive="cdrom"
        ),
        "caa": Scenario("caa", *userdata.valid("nginx-caa"), layout="caa", probes="e2e.nat_probe=1", settle=CAA_SETTLE),
        # The byom pool VM: the upload (by a test unit in the guest) once the agent waits; and
        # byom-early: the upload under way when the agent first looks (a read lease tells the agent
        # the file is still open for writing, so it waits for the close).
        "byom": byom("byom", "e2e-sftp-delivery.service"),
        "byom-early": byom("byom-early", "e2e-sftp-delivery-early.service"),
        # Nova's DMI strings, so `auto` picks openstack; the config drive alone, or the metadata service alone.
        "openstack": Scenario("openstack", *userdata.valid("nginx-openstack"), azure=False, openstack="config-drive"),
        "openstack-metadata": Scenario(
            "openstack-metadata", *userdata.valid("nginx-openstack-md"), azure=False, openstack="metadata"
        ),
        # The same CAA layouts on Debian 13 with the agent's .deb installed by apt (the distribution's
        # python3, PyYAML, h11, pyroute2; its systemd and kernel): the caa checks, and the byom
        # delivery whose agent waits with the kernel's read lease while the upload is under way.
        "caa-deb": Scenario(
            "caa-deb",
            *userdata.valid("nginx-caa-deb"),
            layout="caa",
            variant="caa-deb",
            probes="e2e.nat_probe=1",
            settle=CAA_SETTLE,
        ),
        "byom-early-deb": byom("byom-early-deb", "e2e-sftp-delivery-early.service", variant="caa-sftp-deb"),
        "byom-deb": byom("byom-deb", "e2e-sftp-delivery.service", variant="caa-sftp-deb"),  # not by default
    }
    return [all_[n] for n in names]


def enter_private_netns(argv: list[str]) -> None:
    """Re-execute under `unshare --net` unless already done; then bring lo up and check it is alone."""
    if os.environ.get("E2E_NETNS") != "1":
        env = dict(os.environ, E2E_NETNS="1")
        os.execvpe("unshare", ["unshare", "--net", "--", sys.executable, *argv], env)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
    # (Not /sys/class/net: sysfs shows the namespace of whoever mounted it.)
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True, timeout=10).stdout
    links = sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())
    if links != ["lo"]:
        raise SystemExit(f"private network namespace has unexpected links: {links}")


def preflight(image: Path) -> str | None:
    if os.geteuid() != 0:
        return "needs root (unshare --net, swtpm, QEMU)"
    for tool in ("qemu-system-x86_64", "qemu-img", "swtpm", "socat", "genisoimage", "unshare", "ip"):
        if shutil.which(tool) is None:
            return f"missing tool: {tool}"
    for f in ("disk.raw", "vmlinuz", "initrd.img", "cmdline"):
        if not (image / f).exists():
            return f"no image: {image / f} (run `make image`)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--boots",
        default=",".join(BOOTS),
        help="comma-separated: " + ", ".join(BOOTS) + " (the default), byom-deb",
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory even when every check passes")
    ap.add_argument("--timeout", type=float, default=BOOT_TIMEOUT_S, help="per boot, seconds")
    ap.add_argument("--workdir", help="default: a new directory under /tmp")
    ap.add_argument("--image", default=str(IMAGE_DIR), help="directory with disk.raw, vmlinuz, initrd.img, cmdline")
    ap.add_argument("--no-probes", action="store_true", help="skip the netns/restart probes (timing runs)")
    args = ap.parse_args()
    image = Path(args.image).resolve()
    why = next(filter(None, (preflight(sc.image(image)) for sc in scenarios(args.boots.split(",")))), None)
    if why:
        print(f"e2e: {why}", file=sys.stderr)
        return 2
    enter_private_netns([str(Path(__file__).resolve()), *sys.argv[1:]])

    top = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="guest-agent-e2e-"))
    t_all = time.monotonic()
    results: list[tuple[BootResult, Checks]] = []
    for sc in scenarios(args.boots.split(",")):
        log(f"boot {sc.name}: starting")
        procs = Procs()
        try:
            res = boot(sc, top / sc.name, procs, args)
        finally:
            procs.close()
        checks = check_boot(res)
        results.append((res, checks))
        log(f"boot {sc.name}: {len(checks.results) - len(checks.failed)}/{len(checks.results)} checks passed "
            f"in {res.wall_s:.1f} s")  # fmt: skip
        for ok, what in checks.results:
            print(f"    {'ok  ' if ok else 'FAIL'} {what}")
        (top / sc.name / "figures.json").write_text(json.dumps(figures(res), indent=2))

    print_figures(results)
    failed = sum(len(c.failed) for _, c in results)
    passed = sum(len(c.results) - len(c.failed) for _, c in results)
    log(f"total {time.monotonic() - t_all:.0f} s; work directory {top}")
    if failed == 0 and not args.keep:
        shutil.rmtree(top, ignore_errors=True)
    print(f"e2e: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def print_figures(results: list[tuple[BootResult, Checks]]) -> None:
    rows = [figures(r) for r, _ in results]
    if not rows:
        return
    names = [r.scenario.name for r, _ in results]
    print("\nboot figures (seconds from QEMU start; TCG):")
    print(f"  {'':28}" + "".join(f"{n:>10}" for n in names))
    for key in rows[0]:
        vals = "".join(f"{'-' if row[key] is None else f'{row[key]:.2f}':>10}" for row in rows)
        print(f"  {key:28}{vals}")
    for r, _ in results:
        d = r.dump or {}
        an = d.get("analyze", "").strip().splitlines()
        if an:
            print(f"  {r.scenario.name}: {an[0]}")
    print("agent stages (start-end, seconds from QEMU start):")
    for r, _ in results:
        tl = (r.dump or {}).get("timeline", {})
        off = guest.clock_offset(r.console)
        if not isinstance(tl, dict) or off is None:
            continue
        parts = [
            f"{st['name']} {st['start'] + off:.2f}-{(st['end'] or st['start']) + off:.2f}"
            for st in tl.get("stages", [])
        ]
        print(f"  {r.scenario.name}: " + ", ".join(parts))


if __name__ == "__main__":
    sys.exit(main())
