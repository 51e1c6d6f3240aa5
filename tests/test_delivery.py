"""byom delivery: the agent waits (inotify) for CAA's SFTP client to write and close user-data.

The process tests run the real agent (`guest-agent run`) in a private mount namespace where
<root>/media/cidata is a tmpfs mount point, as media-cidata.mount makes it on a byom pool VM,
with a real notify socket; the test writes the file through /proc/<pid>/root (the agent's
mount namespace), in pieces, the way sshd's internal-sftp does.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from guest_agent import boot, inotify
from guest_agent.clouds import cidata
from guest_agent.config import CidataConfig, Config
from guest_agent.errors import EXIT_OK, EXIT_UNAVAILABLE, MetadataUnavailable
from guest_agent.notify import Notifier
from tests import caa
from tests.fileset import visible
from tests.test_cidata import SEED, USER_DATA, attach, needs_genisoimage, plain_iso

REPO = Path(__file__).resolve().parent.parent


class Sent(list[str]):
    """A Notifier sender that records what it would send; `waiting` is set by the first STATUS
    (sent once the watch is in place: a writer that starts then cannot be missed)."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()

    def __call__(self, msg: str) -> bool:
        self.append(msg)
        if msg.startswith("STATUS=waiting"):
            self.waiting.set()
        return True


def write_in_pieces(path: Path, data: bytes, *, before_close: threading.Event | None = None) -> None:
    """Create, write in two pieces with a pause between, close: what an SFTP upload does."""
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(0.2)
        f.write(data[len(data) // 2 :])
        f.flush()
        if before_close is not None:
            before_close.set()


def delivery_cfg(deadline_s: float = 0.0) -> CidataConfig:
    return dataclasses.replace(Config().cidata, wait_for_delivery=True, delivery_deadline_s=deadline_s)


# -- the wait itself, in-process, on a plain directory


def test_returns_only_after_the_close(tmp_path: Path) -> None:
    d = tmp_path / "media/cidata"
    d.mkdir(parents=True)
    (d / "meta-data").write_bytes(b"instance-id: x\n")  # before the wait: no event
    done_writing = threading.Event()
    sent = Sent()

    def writer() -> None:
        assert sent.waiting.wait(30)
        (d / "reboot").write_bytes(b"")  # another name's close: ignored
        write_in_pieces(d / "user-data", USER_DATA, before_close=done_writing)

    t = threading.Thread(target=writer)
    t.start()
    cidata.wait_for_delivery(str(tmp_path), delivery_cfg(), Notifier(sent))
    assert done_writing.is_set()  # the close came after this was set: not a partial read
    t.join()
    assert (d / "user-data").read_bytes() == USER_DATA
    assert sent[0] == "STATUS=waiting for /media/cidata/user-data to be delivered (no deadline)"
    assert sent[1] == "EXTEND_TIMEOUT_USEC=30000000"  # three heartbeats of 10 s


def test_a_file_renamed_into_place_counts(tmp_path: Path) -> None:
    d = tmp_path / "media/cidata"
    d.mkdir(parents=True)
    sent = Sent()

    def writer() -> None:
        assert sent.waiting.wait(30)
        (d / ".user-data.part").write_bytes(USER_DATA)
        os.rename(d / ".user-data.part", d / "user-data")

    t = threading.Thread(target=writer)
    t.start()
    cidata.wait_for_delivery(str(tmp_path), delivery_cfg(), Notifier(sent))
    t.join()
    assert sent[-1] == "EXTEND_TIMEOUT_USEC=30000000"  # returned on the rename, not on a heartbeat


def test_heartbeats_keep_the_start_timeout_alive(tmp_path: Path) -> None:
    (tmp_path / "media/cidata").mkdir(parents=True)
    sent = Sent()
    with pytest.raises(MetadataUnavailable) as ei:
        cidata.wait_for_delivery(str(tmp_path), delivery_cfg(0.35), Notifier(sent), heartbeat_s=0.1)
    assert ei.value.exit_code == EXIT_UNAVAILABLE
    assert ei.value.reason == "no user-data was delivered by the deadline"
    assert ei.value.supporting_data == {"seed": "/media/cidata/user-data", "waited_s": 0.35}
    assert sent[0] == "STATUS=waiting for /media/cidata/user-data to be delivered (up to 0.35 s)"
    beats = [m for m in sent if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert len(beats) >= 2 and set(beats) == {"EXTEND_TIMEOUT_USEC=300000"}  # each one grants 3 x 0.1 s


def test_a_vanished_directory_ends_the_wait(tmp_path: Path) -> None:
    d = tmp_path / "media/cidata"
    d.mkdir(parents=True)
    t = threading.Timer(0.1, d.rmdir)
    t.start()
    with pytest.raises(MetadataUnavailable, match="went away"):
        cidata.wait_for_delivery(str(tmp_path), delivery_cfg(), Notifier(Sent()))
    t.join()


def test_a_file_already_there_is_not_waited_for(tmp_path: Path) -> None:
    """Seen right after subscribing: delivered before the look (an empty one is still being written)."""
    d = tmp_path / "media/cidata"
    d.mkdir(parents=True)
    (d / "user-data").write_bytes(USER_DATA)
    sent = Sent()
    cidata.wait_for_delivery(str(tmp_path), delivery_cfg(), Notifier(sent))
    assert sent == []


def test_an_empty_file_is_being_written_so_its_close_is_awaited(tmp_path: Path) -> None:
    d = tmp_path / "media/cidata"
    d.mkdir(parents=True)
    sent = Sent()
    with open(d / "user-data", "wb") as f:  # SFTP's create: the file exists, empty, still open

        def writer() -> None:
            assert sent.waiting.wait(30)
            f.write(USER_DATA)
            f.close()

        t = threading.Thread(target=writer)
        t.start()
        cidata.wait_for_delivery(str(tmp_path), delivery_cfg(), Notifier(sent))
        t.join()
        assert f.closed


def test_a_partly_written_file_still_open_is_awaited(tmp_path: Path) -> None:
    """The upload began before the agent looked (byom-early): non-empty, still open for writing."""
    d = tmp_path / "media/cidata"
    d.mkdir(parents=True)
    sent = Sent()
    closed_at: list[float] = []
    with open(d / "user-data", "wb") as f:
        f.write(USER_DATA[:10])
        f.flush()
        assert cidata.being_written(str(d / "user-data"))  # the kernel refuses a read lease

        def writer() -> None:
            assert sent.waiting.wait(30)
            f.write(USER_DATA[10:])
            closed_at.append(time.monotonic())
            f.close()

        t = threading.Thread(target=writer)
        t.start()
        cidata.wait_for_delivery(str(tmp_path), delivery_cfg(), Notifier(sent))
        returned_at = time.monotonic()
        t.join()
    assert closed_at and closed_at[0] <= returned_at
    assert (d / "user-data").read_bytes() == USER_DATA


def test_a_close_the_probe_still_sees_open_is_probed_again(tmp_path: Path) -> None:
    """The kernel sends IN_CLOSE_WRITE before it drops the closer's write access: the probe right
    after the event can still refuse the lease (seen under TCG in the byom-early e2e boot, where the
    agent then waited for ever).  The injected probe answers "open" once, as in that window."""
    d = tmp_path / "media/cidata"
    d.mkdir(parents=True)
    sent = Sent()
    answers: list[bool] = []

    def probe(path: str) -> bool:
        answers.append(True if not answers else cidata.being_written(path))
        return answers[-1]

    def writer() -> None:
        assert sent.waiting.wait(30)
        write_in_pieces(d / "user-data", USER_DATA)

    t = threading.Thread(target=writer)
    t.start()
    # A deadline, so that a wait that missed the close fails instead of hanging the suite.
    cidata.wait_for_delivery(str(tmp_path), delivery_cfg(60.0), Notifier(sent), probe=probe)
    t.join()
    assert answers[0] is True and answers[-1] is False
    assert (d / "user-data").read_bytes() == USER_DATA


def test_a_close_just_before_the_subscription_is_not_missed(tmp_path: Path) -> None:
    """The same window at the first look: the upload closed (its event before the watch existed)
    while the probe still saw it open.  No event will come; the re-probe finds it delivered."""
    d = tmp_path / "media/cidata"
    d.mkdir(parents=True)
    (d / "user-data").write_bytes(USER_DATA)
    answers: list[bool] = []

    def probe(path: str) -> bool:
        answers.append(True if not answers else cidata.being_written(path))
        return answers[-1]

    cidata.wait_for_delivery(str(tmp_path), delivery_cfg(60.0), Notifier(Sent()), probe=probe)
    assert answers[0] is True and answers[-1] is False


def test_a_second_writer_still_open_is_awaited(tmp_path: Path) -> None:
    """A close while another writer still holds the file open is not the delivery."""
    d = tmp_path / "media/cidata"
    d.mkdir(parents=True)
    sent = Sent()
    closed_at: list[float] = []
    first = open(d / "user-data", "wb")  # noqa: SIM115 (closed by the writer thread)
    with open(d / "user-data", "r+b") as second:

        def writer() -> None:
            assert sent.waiting.wait(30)
            first.write(USER_DATA[:10])
            first.close()  # the first writer's close: the second still has it open
            time.sleep(0.3)
            second.seek(10)
            second.write(USER_DATA[10:])
            closed_at.append(time.monotonic())
            second.close()

        t = threading.Thread(target=writer)
        t.start()
        cidata.wait_for_delivery(str(tmp_path), delivery_cfg(60.0), Notifier(sent))
        returned_at = time.monotonic()
        t.join()
    assert closed_at and closed_at[0] <= returned_at
    assert (d / "user-data").read_bytes() == USER_DATA


def test_being_written_answers_from_the_lease(tmp_path: Path) -> None:
    p = tmp_path / "user-data"
    assert not cidata.being_written(str(p))  # absent
    p.write_bytes(b"")
    assert cidata.being_written(str(p))  # created, nothing written yet
    with open(p, "ab") as f:
        f.write(b"x")
        f.flush()
        assert cidata.being_written(str(p))  # open for writing
    assert not cidata.being_written(str(p))  # written and closed


def test_pending_only_on_a_mount_point_without_user_data(tmp_path: Path) -> None:
    (tmp_path / "media/cidata").mkdir(parents=True)
    assert not cidata.delivery_pending(str(tmp_path), delivery_cfg())  # a plain directory
    assert not cidata.delivery_pending("/", dataclasses.replace(delivery_cfg(), wait_for_delivery=False))
    mounted = delivery_cfg()
    assert cidata.delivery_pending("/", dataclasses.replace(mounted, mount_dir="/proc/self/fdinfo")) is False
    assert cidata.delivery_pending("/", dataclasses.replace(mounted, mount_dir="/proc"))  # a mount point


def test_inotify_parse_drops_a_truncated_record() -> None:
    rec = inotify._EVENT.pack(1, inotify.IN_CLOSE_WRITE, 0, 16) + b"user-data".ljust(16, b"\0")
    assert inotify.parse(rec + rec[:20]) == [(inotify.IN_CLOSE_WRITE, "user-data")]


# -- the ISO disk path is unchanged when there is no mount point


@needs_genisoimage
@pytest.mark.parametrize("seed_dir", ["absent", "plain directory"])
def test_the_iso_disk_path_is_unchanged(tmp_path: Path, cfg: Config, seed_dir: str) -> None:
    root = tmp_path / "root"
    attach(root, "sr0", plain_iso(tmp_path, SEED))
    if seed_dir == "plain directory":
        (root / "media/cidata").mkdir(parents=True)
    cfg = dataclasses.replace(cfg, cidata=dataclasses.replace(delivery_cfg(), wait_s=0.0))
    sent = Sent()
    rc = boot.run(cfg, str(root), boot.Deps(notifier=Notifier(sent)))
    assert rc == EXIT_OK
    assert sent[0].startswith("EXTEND_TIMEOUT_USEC=")  # the start budget, once
    assert not any(m.startswith("EXTEND_TIMEOUT_USEC") or "delivery" in m for m in sent[1:]), sent
    assert visible(root / "run/peerpod")["apf.json"][1] == caa.expected_files()["/run/peerpod/apf.json"]


# -- the real agent process, in a mount namespace where media/cidata is a tmpfs


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    yield s, path
    s.close()


def recv_until(s: socket.socket, pred: str, timeout: float = 60.0) -> list[str]:
    """Messages up to and including the first containing `pred` (a hang guard, not a timing)."""
    s.settimeout(timeout)
    out = []
    while True:
        msg = s.recv(4096).decode()
        out.append(msg)
        if pred in msg:
            return out


@contextmanager
def agent(tmp_path: Path, notify: str, deadline_s: float = 0.0) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private tmpfs mount point")
    root = tmp_path / "root"
    caa.make_root(str(root), {"sys_vendor": "QEMU", "product_name": "Standard PC"})  # no cloud detected
    (root / "media/cidata").mkdir(parents=True)
    conf = tmp_path / "c.toml"
    conf.write_text(
        "[netns]\nenabled = false\n[tpm]\nenabled = false\n"
        f"[cidata]\nwait_s = 0.0\nwait_for_delivery = true\ndelivery_deadline_s = {deadline_s}\n"
    )
    env = {**os.environ, "NOTIFY_SOCKET": notify}
    env.pop("JOURNAL_STREAM", None)
    # unshare(1) without --fork execs: sh and then the agent keep the pid, so /proc/<pid>/root
    # is the agent's view, tmpfs included.
    mount = 'mount -t tmpfs -o mode=0755 tmpfs "$0" && exec "$@"'
    agent = [sys.executable, "-m", "guest_agent", "run", "--root", str(root), "--config", str(conf)]
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, str(root / "media/cidata"), *agent]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    try:
        yield proc, root
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.privileged
def test_agent_waits_for_the_sftp_close_then_provisions(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    s, path = notify_socket
    with agent(tmp_path, path) as (proc, root):
        early = recv_until(s, "STATUS=waiting for /media/cidata/user-data")
        assert "STATUS=delivery" in early  # the delivery wait names what it waits for itself
        seed = Path(f"/proc/{proc.pid}/root{root}/media/cidata/user-data")
        assert not (root / "media/cidata/user-data").exists()  # the tmpfs is the agent's alone
        with open(seed, "wb") as f:
            f.write(USER_DATA[: len(USER_DATA) // 2])
            f.flush()
            # Half a document is there: the agent must still be waiting (no READY, no exit).
            s.settimeout(0.5)
            with pytest.raises(TimeoutError):
                while True:
                    early.append(s.recv(4096).decode())
                    assert "READY=1" not in early[-1]
            assert proc.poll() is None
            assert not (root / "run/peerpod").exists()
            f.write(USER_DATA[len(USER_DATA) // 2 :])
        late = recv_until(s, "READY=1")
        assert proc.wait(60) == EXIT_OK
    assert [m for m in early + late if m.startswith("EXTEND_TIMEOUT_USEC=")]
    got = {f"/run/peerpod/{n}": v[1] for n, v in visible(root / "run/peerpod").items()}
    assert {k: got.get(k) for k in caa.expected_files()} == caa.expected_files()


@pytest.mark.privileged
def test_agent_gives_up_at_the_delivery_deadline(tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    with agent(tmp_path, path, deadline_s=0.3) as (proc, root):
        msgs = recv_until(s, "STATUS=failed")
        assert proc.wait(60) == EXIT_UNAVAILABLE
    assert msgs[-1] == "STATUS=failed: no user-data was delivered by the deadline"
    assert "STATUS=waiting for /media/cidata/user-data to be delivered (up to 0.3 s)" in msgs
    assert not any("READY=1" in m for m in msgs)
    assert not (root / "run/peerpod").exists()


def test_config_refuses_a_negative_deadline(tmp_path: Path) -> None:
    from guest_agent import config
    from guest_agent.errors import ConfigError

    conf = tmp_path / "c.toml"
    conf.write_text("[cidata]\ndelivery_deadline_s = -1\n")
    with pytest.raises(ConfigError, match="delivery_deadline_s"):
        config.load(str(tmp_path / "nothing"), str(conf))
