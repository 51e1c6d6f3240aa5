"""The image's stand-in agent-protocol-forwarder, run on the host (it is standard-library Python)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

APF = Path(__file__).resolve().parents[2] / "image" / "overlay" / "usr" / "local" / "bin" / "agent-protocol-forwarder"


def run_apf(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(APF), *args], capture_output=True, text=True, timeout=30, env=env)


def test_refuses_to_start_without_apf_json(tmp_path: Path) -> None:
    missing = tmp_path / "apf.json"
    r = run_apf("-config", str(missing))
    assert r.returncode == 1
    assert f"failed to open {missing}" in r.stderr
    assert r.stdout.startswith("agent-protocol-forwarder version ")


def test_bad_flag_exits_1_and_help_exits_0() -> None:
    assert run_apf("-no-such-flag").returncode == 1
    assert run_apf("-h").returncode == 0


def test_rejects_config_without_pod_network(tmp_path: Path) -> None:
    cfg = tmp_path / "apf.json"
    cfg.write_text(json.dumps({"pod-name": "x"}))
    r = run_apf("-config", str(cfg), "-pod-namespace", "")
    assert r.returncode == 1 and "pod-network" in r.stderr


def test_rejects_a_config_that_is_not_json(tmp_path: Path) -> None:
    cfg = tmp_path / "apf.json"
    for text in ('{"pod-network": {}', '{"pod-network": {}} trailing', "", "\udcff"):
        cfg.write_text(text, errors="surrogateescape")
        r = run_apf("-config", str(cfg), "-pod-namespace", "")
        assert r.returncode == 1 and f"failed to decode {cfg}" in r.stderr, text


def test_requires_a_mounted_pod_netns(tmp_path: Path) -> None:
    cfg = tmp_path / "apf.json"
    cfg.write_text(json.dumps({"pod-network": {}}))
    plain = tmp_path / "podns"
    plain.touch()  # what a netns created in a sandboxed mount namespace looks like from outside
    r = run_apf("-config", str(cfg), "-pod-namespace", str(plain))
    assert r.returncode == 1 and "not a mounted netns" in r.stderr


def test_listens_notifies_ready_and_announces_the_pod(tmp_path: Path) -> None:
    cfg = tmp_path / "apf.json"
    cfg.write_text(json.dumps({"pod-network": {"podip": "10.0.0.2/24"}, "pod-namespace": "ns", "pod-name": "p"}))
    with socket.socket(socket.AF_INET) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(20)
        env = dict(os.environ, NOTIFY_SOCKET=str(notify_path))
        p = subprocess.Popen(
            [sys.executable, str(APF), "-config", str(cfg), "-pod-namespace", "", "-listen", f"127.0.0.1:{port}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            msg = notify.recv(4096).decode()
            assert msg.startswith("READY=1")
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.settimeout(10)
                assert c.recv(256) == b"agent-protocol-forwarder stand-in pod=ns/p\n"
            p.terminate()
            assert p.wait(10) == 0
            assert notify.recv(4096) == b"STOPPING=1"
        finally:
            p.kill()
            p.wait(10)
