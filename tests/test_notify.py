"""sd_notify on a real bound AF_UNIX datagram socket, and the agent's READY=1/STATUS= sequence."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent import boot
from guest_agent.config import Config
from guest_agent.notify import Notifier
from tests import caa
from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Reply, Script


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(10)
    yield s, path
    s.close()


def recv_all(s: socket.socket) -> list[str]:
    out = []
    s.setblocking(False)
    while True:
        try:
            out.append(s.recv(4096).decode())
        except BlockingIOError:
            return out


def test_notifier_sends_to_the_socket(
    notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    s, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier()
    assert n.status("fetch")
    assert n.ready("config files written")
    assert recv_all(s) == ["STATUS=fetch", "READY=1\nSTATUS=config files written"]


def test_notifier_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"guest-agent-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier().ready("x")
        assert recv_all(s) == ["READY=1\nSTATUS=x"]
    finally:
        s.close()


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path", "@"])
def test_unsupported_addresses_are_not_used(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert Notifier().notify("EXTEND_TIMEOUT_USEC=1000000") is False


def test_any_message_goes_through(notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    s, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier().notify("EXTEND_TIMEOUT_USEC=30000000\nSTATUS=waiting for user-data")
    assert recv_all(s) == ["EXTEND_TIMEOUT_USEC=30000000\nSTATUS=waiting for user-data"]


def test_notifier_without_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier().ready("x") is False


def test_notifier_bad_socket_is_logged_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    n = Notifier()
    assert n.ready("x") is False  # sendto raises ENOENT/ECONNREFUSED here; the wrapper must not
    assert n.status("y") is False


def run_on_aws(tmp_path: Path, notify_path: str, script: Script) -> int:
    """`guest-agent run` in a child against a fake EC2 IMDS, notifying `notify_path`."""
    root = tmp_path / "root"
    caa.make_root(str(root), {"sys_vendor": "Amazon EC2", "product_name": "m6i.large"})
    with FakeServer("imds", imds.aws(caa.cloud_config(), script)) as srv:
        conf = tmp_path / "c.toml"
        conf.write_text(f'[aws]\nimds_url = "{srv.url}"\n[netns]\nenabled = false\n[tpm]\nenabled = false\n')
        env = {**os.environ, "NOTIFY_SOCKET": notify_path}
        env.pop("JOURNAL_STREAM", None)
        return subprocess.call(
            [sys.executable, "-m", "guest_agent", "run", "--root", str(root), "--config", str(conf)], env=env
        )


def test_agent_sends_status_per_stage_then_ready(notify_socket: tuple[socket.socket, str], tmp_path: Path) -> None:
    s, path = notify_socket
    assert run_on_aws(tmp_path, path, Script()) == 0
    msgs = recv_all(s)
    # First, before any wait: the start timeout from the configured deadlines (defaults, TPM off here).
    no_tpm = Config(tpm=dataclasses.replace(Config().tpm, enabled=False))
    assert msgs[0] == f"EXTEND_TIMEOUT_USEC={int(boot.start_budget_s(no_tpm) * 1e6)}"
    statuses = [m for m in msgs if m.startswith("STATUS=")]
    assert statuses[:6] == [
        "STATUS=detect: reading DMI",
        "STATUS=network: waiting for a route to 127.0.0.1",
        "STATUS=fetch: fetching user-data from aws (deadline 180 s)",
        "STATUS=validate: validating user-data",
        "STATUS=write: writing 6 files to /run/peerpod",
        "STATUS=measure: measuring initdata into PCR 8",
    ]
    ready = [m for m in msgs if "READY=1" in m]
    assert len(ready) == 1
    assert msgs.index(ready[0]) > msgs.index(statuses[4])  # READY=1 only after the files are written


def test_no_ready_on_failure(notify_socket: tuple[socket.socket, str], tmp_path: Path) -> None:
    s, path = notify_socket
    root = tmp_path / "root"
    caa.make_root(str(root), {"sys_vendor": "Amazon EC2"})
    with FakeServer("imds", imds.aws(b"#cloud-config\nruncmd: [reboot]\n", Script())) as srv:
        conf = tmp_path / "c.toml"
        conf.write_text(f'[aws]\nimds_url = "{srv.url}"\n[netns]\nenabled = false\n[tpm]\nenabled = false\n')
        env = {**os.environ, "NOTIFY_SOCKET": path}
        rc = subprocess.call(
            [sys.executable, "-m", "guest_agent", "run", "--root", str(root), "--config", str(conf)], env=env
        )
    assert rc == 78
    msgs = recv_all(s)
    assert not any("READY=1" in m for m in msgs)
    assert any(m.startswith("STATUS=failed: user-data has keys") for m in msgs)


def test_start_budget_follows_the_configured_deadlines() -> None:
    base = boot.start_budget_s(Config())
    # network, fetch, cidata disk, TPM device, NotReady report
    assert base == 120 + 180 + 5 + 30 + 300 + boot.START_SLACK_S
    longer = Config(fetch=dataclasses.replace(Config().fetch, deadline_s=900.0))
    assert boot.start_budget_s(longer) == base + 720
    no_wait = Config(network=dataclasses.replace(Config().network, wait=False))
    assert boot.start_budget_s(no_wait) == base - 120
    no_tpm = Config(tpm=dataclasses.replace(Config().tpm, enabled=False))
    assert boot.start_budget_s(no_tpm) == base - 30


def test_status_carries_the_last_retry_reason(notify_socket: tuple[socket.socket, str], tmp_path: Path) -> None:
    """`systemctl status guest-agent` says what the agent retries and why, while it retries."""
    s, path = notify_socket
    assert run_on_aws(tmp_path, path, Script({"user-data": [Reply(status=503, body=b"warming up")]})) == 0
    retries = [m for m in recv_all(s) if m.startswith("STATUS=fetch: fetching user-data (aws): ")]
    assert len(retries) == 1, retries
    assert re.fullmatch(
        r"STATUS=fetch: fetching user-data \(aws\): .*HTTP 503 \(warming up\) \(attempt 1, retrying, \d+ s left\)",
        retries[0],
    ), retries
