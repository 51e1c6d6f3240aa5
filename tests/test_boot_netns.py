"""The boot path with the pod netns on: podns exists before READY=1; the IMDS NAT wait runs
after READY=1 and never blocks it.  Namespaces live under the test's own root (--root)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent import cli, netns
from tests import caa
from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Script
from tests.netutil import require_netns

pytestmark = pytest.mark.privileged


@pytest.fixture
def root(tmp_path: Path) -> Iterator[Path]:
    require_netns()
    r = tmp_path / "root"
    caa.make_root(str(r), {"sys_vendor": "Amazon EC2"})
    yield r
    run_dir = r / "run/netns"
    if run_dir.is_dir():
        for name in os.listdir(run_dir):
            netns.remove_netns(name, run_dir=str(run_dir))
        subprocess.run(["umount", "-l", str(run_dir)], capture_output=True)


def run_agent(root: Path, tmp_path: Path, extra_conf: str) -> tuple[int, list[str], bool]:
    """Run the agent; return (exit code, notify messages, podns existed when READY=1 arrived)."""
    sock_path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(sock_path)
    s.settimeout(30)
    msgs: list[str] = []
    podns_at_ready = False
    with FakeServer("imds", imds.aws(caa.cloud_config(), Script())) as srv:
        conf = tmp_path / "c.toml"
        conf.write_text(f'[aws]\nimds_url = "{srv.url}"\n[tpm]\nenabled = false\n{extra_conf}')
        env = {**os.environ, "NOTIFY_SOCKET": sock_path}
        proc = subprocess.Popen(
            [sys.executable, "-m", "guest_agent", "run", "--root", str(root), "--config", str(conf)], env=env
        )
        try:
            while True:
                m = s.recv(4096).decode()
                msgs.append(m)
                if "READY=1" in m:
                    podns_at_ready = (root / "run/netns/podns").exists() and os.path.ismount(root / "run/netns/podns")
                if m.startswith("STATUS=done") or m.startswith("STATUS=failed"):
                    break
        finally:
            rc = proc.wait(timeout=60)
            s.close()
    return rc, msgs, podns_at_ready


def test_podns_exists_before_ready(root: Path, tmp_path: Path) -> None:
    rc, msgs, podns_at_ready = run_agent(root, tmp_path, "[netns]\nimds_nat = false\n")
    assert rc == 0
    assert "STATUS=netns" in msgs
    assert podns_at_ready


def test_nat_wait_does_not_block_ready(root: Path, tmp_path: Path) -> None:
    """No pod address ever appears: READY=1 is sent at once, the NAT step fails at its deadline."""
    rc, msgs, podns_at_ready = run_agent(
        root, tmp_path, '[netns]\nimds_nat_deadline_s = 1.0\nimds_addr = "169.254.169.254"\n'
    )
    assert podns_at_ready
    assert rc == 69  # reported, not silently skipped
    # READY=1 went out before the NAT wait even started (a NAT step moved before READY=1, or
    # run synchronously, would put the mark after the stage's start or end).
    doc = json.loads((root / "run/guest-agent/timeline.json").read_bytes())
    nat = next(s for s in doc["stages"] if s["name"] == "imds-nat")
    assert doc["marks"]["ready"] <= nat["start"]
    assert nat["ok"] is False and nat["end"] - nat["start"] >= 1.0  # it waited its deadline
    assert any("READY=1" in m for m in msgs)


def test_cli_netns_ensure_is_idempotent(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["netns", "ensure", "--root", str(root)]) == 0
    assert cli.main(["netns", "ensure", "--root", str(root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["podns: created", "podns: exists"]
