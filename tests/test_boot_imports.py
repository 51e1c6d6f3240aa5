"""The boot path's one import rule: no module is imported for the first time between the moment
the route to the metadata address appears and READY=1.  What the agent imports before the route
overlaps the DHCP exchange the VM waits for anyway; an import after it delays Ready
(boot.warm imports the late ones up front).

A real `guest-agent run`, in a network namespace the test creates, against the fake cloud served
in that namespace: the metadata address is put on a link while the agent waits for its route.
An audit hook (timeline.AUDIT_EVENT) writes `sorted(sys.modules)` when the network stage ends (the
route is there) and at the "ready" mark (READY=1 sent to a real notify socket)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from guest_agent.podnet.nsenter import run_in_netns
from guest_agent.timeline import AUDIT_EVENT
from tests import caa
from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Script
from tests.fakecloud.wireserver import FakeWireserver
from tests.netutil import namespaces

METADATA = "169.254.169.254"
URL_KEYS = {
    "azure": "imds_url",
    "aws": "imds_url",
    "gcp": "metadata_url",
    "alibaba": "metadata_url",
    "ibmcloud": "metadata_url",
    "openstack": "metadata_url",
}

# The agent's own entry point with one audit hook in front of it; `{out}` + "network" / "ready".
HOOKED_RUN = """
import sys
def snapshot(event, args):
    if event == {event!r} and args in (("end", "network"), ("mark", "ready")):
        with open({out!r} + args[1], "w") as f:
            f.write("\\n".join(sorted(sys.modules)))
sys.addaudithook(snapshot)
from guest_agent.cli import main
sys.exit(main())
"""


def _config(cloud: str, imds_port: int, wireserver_port: int) -> str:
    sections = {cloud: f'{URL_KEYS[cloud]} = "http://{METADATA}:{imds_port}"'}
    azure = f'wireserver_url = "http://{METADATA}:{wireserver_port}"'
    sections["azure"] = f"{sections['azure']}\n{azure}" if cloud == "azure" else azure
    return f'provider = "{cloud}"\n' + "".join(f"[{name}]\n{body}\n" for name, body in sections.items())


class _Lines:
    """The agent's stderr, read by a thread; `seen` is set once a line holds `wanted`."""

    def __init__(self, stream: object, wanted: str) -> None:
        self.lines: list[str] = []
        self.seen = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(stream, wanted), daemon=True)
        self.thread.start()

    def _read(self, stream: object, wanted: str) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line)
            if wanted in line:
                self.seen.set()

    def tail(self) -> str:
        return "".join(self.lines[-40:])


def _user_data(shape: str) -> bytes:
    doc = caa.cloud_config(initdata=caa.initdata_toml())
    if shape == "quoted":  # not the template's shape: read by libyaml, not safeyaml.compose_block
        doc = doc.replace(b"- path: /run/peerpod/scratch-space.marker", b'- path: "/run/peerpod/scratch-space.marker"')
    return doc


@pytest.mark.privileged
@pytest.mark.parametrize(("cloud", "shape"), [*((c, "template") for c in sorted(URL_KEYS)), ("azure", "quoted")])
def test_no_module_is_imported_first_between_the_route_and_ready(cloud: str, shape: str, tmp_path: Path) -> None:
    root = tmp_path / "root"
    caa.make_root(str(root), {})  # TPM on (the default) and absent: the measure stage still runs
    user_data = _user_data(shape)
    out = str(tmp_path / "modules.")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(60)
    with namespaces(tmp_path) as ns, notify:
        vm = ns.add("vm")  # lo only: no route to the metadata address yet
        handler = getattr(imds, cloud)(user_data, Script())
        # Created in the namespace: their listening sockets live there.
        srv = run_in_netns(vm, lambda: FakeServer("imds", handler, host="0.0.0.0"))
        ws = run_in_netns(vm, lambda: FakeWireserver(host="0.0.0.0"))
        with srv, ws:
            conf = tmp_path / "c.toml"
            conf.write_text(_config(cloud, srv.port, ws.server.port))
            code = HOOKED_RUN.format(event=AUDIT_EVENT, out=out)
            env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
            env["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
            argv = [sys.executable, "-c", code, "run", "--root", str(root), "--config", str(conf)]
            proc = subprocess.Popen(
                ["nsenter", f"--net={vm}", *argv], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            stderr = _Lines(proc.stderr, "waiting for netlink events")
            try:
                assert stderr.seen.wait(60), f"the agent did not wait for the route:\n{stderr.tail()}"
                ns.add_stub_link("vm", "eth0")
                ns.sh("vm", f"ip addr add {METADATA}/16 dev eth0")
                msgs = []
                while not msgs or not msgs[-1].startswith(("STATUS=done", "STATUS=failed")):
                    msgs.append(notify.recv(4096).decode())
                rc = proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                stderr.thread.join(timeout=10)
            reports = ws.accepted()
    assert rc == 0, stderr.tail()
    assert any("READY=1" in m.splitlines() for m in msgs), msgs
    assert [r.state for r in reports] == (["Ready"] if cloud == "azure" else [])
    at_route = set(Path(out + "network").read_text().split("\n"))
    at_ready = set(Path(out + "ready").read_text().split("\n"))
    assert "guest_agent.boot" in at_route
    late = sorted(at_ready - at_route)
    assert late == [], f"imported for the first time between the route and READY=1: {late}"
