"""The boot path leaves the pod network alone: `guest-agent run` creates no network namespace and
sets up no NAT (netns@podns.service and guest-agent-imds-nat.service do, units/).  READY=1 means
files written and initdata measured; nothing runs after it but the fabric report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from tests import caa
from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Script


def run_agent(root: Path, tmp_path: Path) -> tuple[int, list[str]]:
    """Run the agent against a fake AWS IMDS; return (exit code, notify messages)."""
    sock_path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(30)
    msgs: list[str] = []
    with FakeServer("imds", imds.aws(caa.cloud_config(), Script())) as srv:
        conf = tmp_path / "c.toml"
        conf.write_text(f'[aws]\nimds_url = "{srv.url}"\n[tpm]\nenabled = false\n')
        env = {**os.environ, "NOTIFY_SOCKET": sock_path}
        proc = subprocess.Popen(
            [sys.executable, "-m", "guest_agent", "run", "--root", str(root), "--config", str(conf)], env=env
        )
        try:
            while True:
                m = s.recv(4096).decode()
                msgs.append(m)
                if m.startswith("STATUS=done") or m.startswith("STATUS=failed"):
                    break
        finally:
            rc = proc.wait(timeout=60)
            s.close()
    return rc, msgs


def test_run_makes_no_pod_network(tmp_path: Path) -> None:
    root = tmp_path / "root"
    caa.make_root(str(root), {"sys_vendor": "Amazon EC2"})
    rc, msgs = run_agent(root, tmp_path)
    assert rc == 0
    assert any("READY=1" in m for m in msgs)
    assert not (root / "run/netns").exists()
    doc = json.loads((root / "run/guest-agent/timeline.json").read_bytes())
    stages = [s["name"] for s in doc["stages"]]
    assert "netns" not in stages and "imds-nat" not in stages
    assert stages[-1] == "measure"  # READY=1 follows the measurement directly
    assert doc["marks"]["ready"] >= doc["stages"][-1]["end"]
