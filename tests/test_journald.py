"""What a real systemd-journald stores from the agent's handler, read back with `journalctl -o json`.

journald runs in a private mount namespace the fixture creates: the test's `run/` directory is
bound over /run (its sockets and a volatile journal land there) and `etc/` over /etc/systemd (a
journald.conf that reads no kernel messages and forwards nothing).  The sockets are reachable from
outside through the test's directory, so this process sends to the same socket the agent would.
journald carries PR_SET_PDEATHSIG: it ends with the test process on any exit path, and the mount
namespace with it.
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent import log as agent_log
from tests import caa

REPO = Path(__file__).resolve().parents[1]
JOURNALDS = ("/lib/systemd/systemd-journald", "/usr/lib/systemd/systemd-journald")
JOURNALD = next((p for p in JOURNALDS if os.access(p, os.X_OK)), None)
CONF = """[Journal]
Storage=volatile
ReadKMsg=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitBurst=0
"""
# Run inside the new mount namespace: $0 = the test's run dir, $1 = its etc dir, then journald.
INSIDE = 'mount --bind "$0" /run && mount --bind "$1" /etc/systemd && exec "$2"'
WAIT_S = 30.0  # a bound for journald and journalctl on a loaded machine, not a figure under test


class Journald:
    def __init__(self, top: Path, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.run = top / "run"
        self.socket = str(self.run / "systemd/journal/socket")
        self.stdout_socket = str(self.run / "systemd/journal/stdout")

    def entries(self, *matches: str, count: int) -> list[dict[str, Any]]:
        """The entries matching FIELD=value `matches`, once there are `count` of them."""
        end = time.monotonic() + WAIT_S
        while True:
            out = subprocess.run(
                ["journalctl", f"--directory={self.run}/log/journal", "-o", "json", "--no-pager", *matches],
                capture_output=True, text=True, timeout=WAIT_S, check=False,
            )  # fmt: skip
            got = [decode(json.loads(line)) for line in out.stdout.splitlines() if line.strip()]
            if len(got) >= count or time.monotonic() > end:
                assert len(got) == count, (out.stderr, got)
                return got
            time.sleep(0.1)


def decode(entry: dict[str, Any]) -> dict[str, Any]:
    """journalctl's JSON: a value that is not printable UTF-8 is an array of bytes."""
    return {k: bytes(v).decode() if isinstance(v, list) and all(isinstance(b, int) for b in v) else v
            for k, v in entry.items()}  # fmt: skip


@pytest.fixture(scope="module")
def journald(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journald]:
    if os.geteuid() != 0:
        pytest.skip("needs root for a private mount namespace")
    if JOURNALD is None or shutil.which("journalctl") is None:
        pytest.skip("no systemd-journald/journalctl (Debian package systemd)")
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}(1) (util-linux)")
    if not os.path.isdir("/etc/systemd"):
        pytest.skip("no /etc/systemd to bind journald.conf over")
    top = tmp_path_factory.mktemp("journald")
    (top / "run").mkdir()
    (top / "etc").mkdir()
    (top / "etc/journald.conf").write_text(CONF)
    # journald says READY=1 on $NOTIFY_SOCKET once its sockets are bound (sd_notify(3)), as it does
    # to PID 1: the fixture waits for that datagram, or for journald to exit.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.bind(str(top / "notify"))
    cmd = ["setpriv", "--pdeathsig", "KILL", "unshare", "--mount", "--propagation", "private", "sh", "-c", INSIDE]
    proc = subprocess.Popen(
        [*cmd, str(top / "run"), str(top / "etc"), JOURNALD],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "NOTIFY_SOCKET": str(top / "notify")},
    )  # fmt: skip
    try:
        jd = Journald(top, proc)
        end = time.monotonic() + WAIT_S
        ready = False
        while not ready:
            if proc.poll() is not None or time.monotonic() > end:
                proc.kill()
                err = proc.communicate()[1].decode(errors="replace")
                pytest.skip(f"systemd-journald did not start (exit {proc.returncode}): {err[-500:]}")
            if select.select([notify], [], [], 1.0)[0]:
                ready = b"READY=1" in notify.recv(4096).split(b"\n")
        assert os.path.exists(jd.socket) and os.path.exists(jd.stdout_socket)
        yield jd
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        notify.close()


@pytest.fixture
def agent_log_to(journald: Journald, request: pytest.FixtureRequest) -> Iterator[tuple[logging.Logger, str]]:
    """The agent's JournalHandler sending to the real journald; every entry carries
    GUEST_AGENT_TEST=<this test's name> (a field of `setup`'s), which the reads match on."""
    fields = agent_log.setup(agent_log.DEBUG, journal=True, socket_path=journald.socket)
    fields["GUEST_AGENT_TEST"] = request.node.name
    yield agent_log.logger("guest_agent.test-journald"), f"GUEST_AGENT_TEST={request.node.name}"
    agent_log.setup(agent_log.WARNING, journal=False)


@pytest.mark.privileged
def test_journald_stores_the_fields_and_priorities(
    journald: Journald, agent_log_to: tuple[logging.Logger, str], capsys: pytest.CaptureFixture[str]
) -> None:
    log, match = agent_log_to
    log.debug("debug line")
    log.warning("a warning about %s", "x", extra=agent_log.fields(stage="fetch"))
    extra = {"MESSAGE_ID": agent_log.MSG_APPLIED, **agent_log.fields(stage="ready", elapsed_ms=1.5)}
    line = sys._getframe().f_lineno + 1
    log.info("user-data applied", extra=extra)
    debug, warning, applied = journald.entries(match, count=3)
    assert (debug["MESSAGE"], debug["PRIORITY"]) == ("debug line", "7")
    assert (warning["MESSAGE"], warning["PRIORITY"]) == ("a warning about x", "4")
    assert warning["GUEST_AGENT_STAGE"] == "fetch"
    assert applied["MESSAGE"] == "user-data applied"
    assert applied["MESSAGE_ID"] == agent_log.MSG_APPLIED
    assert applied["PRIORITY"] == "6"
    assert applied["SYSLOG_IDENTIFIER"] == "guest-agent"
    assert (applied["GUEST_AGENT_STAGE"], applied["GUEST_AGENT_ELAPSED_MS"]) == ("ready", "1.5")
    assert (applied["CODE_FILE"], applied["CODE_LINE"]) == (__file__, str(line))
    assert applied["CODE_FUNC"] == "test_journald_stores_the_fields_and_priorities"
    assert (applied["_TRANSPORT"], applied["_PID"]) == ("journal", str(os.getpid()))  # journald's own fields
    # An outcome is also one plain line on stdout (the unit's journal+console stream).
    assert capsys.readouterr().out == "<6>user-data applied\n"


@pytest.mark.privileged
def test_journald_stores_multiline_values_and_tracebacks(
    journald: Journald, agent_log_to: tuple[logging.Logger, str]
) -> None:
    log, match = agent_log_to
    log.error("line one\nline two", extra=agent_log.fields(reason="a\nb", note="é ✓"))
    try:
        raise KeyError("boom")
    except KeyError:
        log.exception("unexpected error")
    multi, exc = journald.entries(match, count=2)
    assert (multi["MESSAGE"], multi["PRIORITY"]) == ("line one\nline two", "3")
    assert (multi["GUEST_AGENT_REASON"], multi["GUEST_AGENT_NOTE"]) == ("a\nb", "é ✓")
    assert exc["MESSAGE"].startswith("unexpected error\nTraceback (most recent call last):\n")
    assert exc["MESSAGE"].endswith("KeyError: 'boom'")
    assert exc["PRIORITY"] == "3"


def stream_to(journald: Journald, identifier: str) -> socket.socket:
    """A stdout/stderr stream to journald as systemd sets one up for a unit (StandardOutput=journal):
    the header is identifier, unit, priority, level prefix, and forwarding to syslog, kmsg, console."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(journald.stdout_socket)
    s.shutdown(socket.SHUT_RD)
    s.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
    return s


@pytest.mark.privileged
@pytest.mark.parametrize("valid", [True, False], ids=["applied", "failed"])
def test_a_real_run_under_journald(journald: Journald, tmp_path: Path, valid: bool) -> None:
    """`guest-agent run` as its unit starts it: in journald's mount namespace, its stdout and stderr a
    journal stream (JOURNAL_STREAM names it): structured entries go over the native socket, and the
    outcome is also one plain line on the stream (the console copy), nothing else is."""
    root = tmp_path / "root"
    caa.make_root(str(root), {"sys_vendor": "QEMU"})
    (root / "media/cidata").mkdir(parents=True)
    entry = "/run/peerpod/apf.json" if valid else "relative/path"
    (root / "media/cidata/user-data").write_text(f"#cloud-config\nwrite_files:\n- path: {entry}\n  content: x\n")
    conf = tmp_path / "c.toml"
    conf.write_text('provider = "cidata"\n[network]\nwait = false\n[netns]\nenabled = false\n[tpm]\nenabled = false\n')
    stream = stream_to(journald, "guest-agent")
    st = os.fstat(stream.fileno())
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    agent = [sys.executable, "-m", "guest_agent", "run", "--root", str(root), "--config", str(conf)]
    # nsenter(1) execs the agent (no fork for a mount namespace): the agent keeps its pid.
    with stream:
        proc = subprocess.Popen(
            ["nsenter", f"--mount=/proc/{journald.proc.pid}/ns/mnt", "--", *agent],
            stdin=subprocess.DEVNULL, stdout=stream.fileno(), stderr=stream.fileno(), env=env, cwd=REPO,
        )  # fmt: skip
    try:
        assert proc.wait(120) == (0 if valid else 78)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    outcome_id = agent_log.MSG_APPLIED if valid else agent_log.MSG_FAILED
    pid = f"_PID={proc.pid}"
    (outcome,) = journald.entries(pid, f"MESSAGE_ID={outcome_id}", count=1)
    assert outcome["_TRANSPORT"] == "journal" and outcome["SYSLOG_IDENTIFIER"] == "guest-agent"
    assert outcome["GUEST_AGENT_PROVIDER"] == "cidata"
    (console,) = journald.entries(pid, "_TRANSPORT=stdout", count=1)
    assert "MESSAGE_ID" not in console
    if valid:
        assert (outcome["PRIORITY"], outcome["GUEST_AGENT_STAGE"]) == ("6", "ready")
        assert (console["PRIORITY"], console["MESSAGE"]) == ("6", outcome["MESSAGE"])
        (timeline,) = journald.entries(pid, f"MESSAGE_ID={agent_log.MSG_TIMELINE}", count=1)
        assert timeline["MESSAGE"].startswith("timeline: ")
    else:
        assert (outcome["PRIORITY"], outcome["GUEST_AGENT_EXIT_CODE"]) == ("3", "78")
        assert outcome["GUEST_AGENT_REASON"] and outcome["GUEST_AGENT_REASON"] in outcome["MESSAGE"]
        assert outcome["CODE_FUNC"] == "fail" and outcome["CODE_FILE"].endswith("guest_agent/boot.py")
        assert (console["PRIORITY"], console["MESSAGE"]) == ("3", outcome["MESSAGE"])


@pytest.mark.privileged
def test_journalctl_x_explains_an_unacknowledged_ready_with_every_field(
    journald: Journald, agent_log_to: tuple[logging.Logger, str], tmp_path: Path
) -> None:
    """A real run whose Ready the wireserver never takes (it accepts and never answers), logged to
    journald and shown by `journalctl -x` with the installed catalog: the explanation names the
    reason, the stage and the exit status, with no @FIELD@ left unfilled."""
    from guest_agent import boot, config
    from guest_agent.notify import Notifier
    from tests.fakecloud import imds
    from tests.fakecloud.server import FakeServer, Script
    from tests.fakecloud.wireserver import FakeWireserver
    from tests.test_units import install

    _, match = agent_log_to
    top = journald.run.parent
    install(top, "PREFIX=/usr")
    subprocess.run(["journalctl", f"--root={top}", "--update-catalog"], check=True, timeout=WAIT_S)
    root = tmp_path / "root"
    caa.make_root(str(root), caa.AZURE_DMI)
    with (
        FakeWireserver(blackhole=True) as ws,
        FakeServer("imds", imds.azure(caa.cloud_config(), Script())) as srv,
    ):
        conf = tmp_path / "c.toml"
        conf.write_text(
            f'[azure]\nimds_url = "{srv.url}"\nwireserver_url = "{ws.url}"\nready_deadline_s = 1.0\n'
            "[netns]\nenabled = false\n[tpm]\nenabled = false\n"
        )
        cfg = config.load(str(root), str(conf))
        fields = agent_log.setup(agent_log.INFO, journal=True, socket_path=journald.socket)
        fields["GUEST_AGENT_TEST"] = match.split("=", 1)[1]
        assert boot.run(cfg, str(root), boot.Deps(notifier=Notifier(lambda m: True), log_fields=fields)) == 0
    (entry,) = journald.entries(match, f"MESSAGE_ID={agent_log.MSG_FAILED}", count=1)
    assert entry["MESSAGE"].startswith("Ready was not acknowledged: ")
    # -x reads the catalog from the fixed /var/lib/systemd/catalog (not --root's): a private mount
    # namespace binds the one compiled above there, for this journalctl alone.
    explain = 'mount --bind "$0" /var/lib/systemd/catalog && exec journalctl -x --no-pager --directory="$1" "$2" "$3"'
    shown = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", explain, str(top / "var/lib/systemd/catalog"),
         str(journald.run / "log/journal"), match, f"MESSAGE_ID={agent_log.MSG_FAILED}"],
        capture_output=True, text=True, timeout=WAIT_S, check=True,
    ).stdout  # fmt: skip
    text = " ".join(shown.replace("░░", " ").split())  # the explanation's lines, unwrapped
    reason = entry["GUEST_AGENT_REASON"]
    assert f"Subject: Pod VM provisioning failed: {reason} " in text, shown
    assert f'gave up in stage "report-ready" with exit status 0. The reason is: {reason}.' in text, shown
    assert "@" not in text.split("Subject:", 1)[1], shown
