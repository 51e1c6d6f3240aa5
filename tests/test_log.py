"""Structured journal entries over journald's native protocol, received on a real socket."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent import log as agent_log


def parse_entry(data: bytes) -> dict[str, str]:
    """The inverse of the native protocol, as journald reads it."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        nl = data.index(b"\n", pos)
        line = data[pos:nl]
        if b"=" in line:
            k, _, v = line.partition(b"=")
            fields[k.decode()] = v.decode()
            pos = nl + 1
        else:
            (n,) = struct.unpack_from("<Q", data, nl + 1)
            start = nl + 9
            fields[line.decode()] = data[start : start + n].decode()
            assert data[start + n : start + n + 1] == b"\n"
            pos = start + n + 1
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, agent_log.Logger, dict[str, str]]]:
    path = str(tmp_path / "journal.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    fields = agent_log.setup(agent_log.DEBUG, journal=True, socket_path=path)
    yield s, agent_log.logger("guest_agent.test-journal"), fields
    agent_log.setup(agent_log.WARNING, journal=False)
    s.close()


def test_entry_carries_structured_fields(journal: tuple[socket.socket, agent_log.Logger, dict[str, str]]) -> None:
    s, logger, fields = journal
    fields["GUEST_AGENT_PROVIDER"] = "azure"
    logger.info(
        "user-data applied",
        extra={"MESSAGE_ID": agent_log.MSG_APPLIED, **agent_log.fields(stage="ready", elapsed_ms=1.5)},
    )
    e = parse_entry(s.recv(65536))
    assert e["MESSAGE"] == "user-data applied"
    assert e["MESSAGE_ID"] == agent_log.MSG_APPLIED
    assert e["PRIORITY"] == "6"
    assert e["SYSLOG_IDENTIFIER"] == "guest-agent"
    assert e["GUEST_AGENT_PROVIDER"] == "azure"
    assert e["GUEST_AGENT_STAGE"] == "ready"
    assert e["GUEST_AGENT_ELAPSED_MS"] == "1.5"
    assert e["CODE_FUNC"] == "test_entry_carries_structured_fields"


def test_multiline_values_use_the_length_prefixed_form(
    journal: tuple[socket.socket, agent_log.Logger, dict[str, str]],
) -> None:
    s, logger, _ = journal
    logger.error("line one\nline two", extra=agent_log.fields(reason="a\nb"))
    e = parse_entry(s.recv(65536))
    assert e["MESSAGE"] == "line one\nline two"
    assert e["GUEST_AGENT_REASON"] == "a\nb"
    assert e["PRIORITY"] == "3"


def test_journald_gone_falls_back_to_stderr(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    agent_log.setup(agent_log.INFO, journal=True, socket_path=str(tmp_path / "absent.sock"))
    try:
        agent_log.logger("guest_agent.test-journal-gone").warning("still visible")
    finally:
        agent_log.setup(agent_log.WARNING, journal=False)
    assert "<4>still visible" in capsys.readouterr().err


def test_lowercase_extra_keys_are_not_fields() -> None:
    assert agent_log.journal_fields({"GUEST_AGENT_STAGE": "fetch", "private": "no"}) == {"GUEST_AGENT_STAGE": "fetch"}


def test_below_the_level_nothing_is_written(capsys: pytest.CaptureFixture[str]) -> None:
    agent_log.setup(agent_log.INFO, journal=False)
    try:
        agent_log.logger("guest_agent.test").debug("hidden %s", "x")
        agent_log.logger("guest_agent.test").info("shown %d%%", 5, extra=agent_log.fields(stage="fetch"))
    finally:
        agent_log.setup(agent_log.WARNING, journal=False)
    assert capsys.readouterr().err == "guest-agent: info: shown 5% [stage=fetch]\n"


def test_outcomes_also_go_to_stdout_for_the_console(
    journal: tuple[socket.socket, agent_log.Logger, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    """Under journald, the unit's stdout is journal+console: the failure reaches the serial console
    as one line with the reason; ordinary entries stay in the journal only."""
    s, logger, _ = journal
    logger.info("[started] fetch", extra=agent_log.fields(stage="fetch"))
    logger.error(
        "provisioning failed: no user-data", extra={"MESSAGE_ID": agent_log.MSG_FAILED, **agent_log.fields(reason="x")}
    )
    assert parse_entry(s.recv(65536))["MESSAGE"] == "[started] fetch"
    assert parse_entry(s.recv(65536))["MESSAGE_ID"] == agent_log.MSG_FAILED
    assert capsys.readouterr().out == "<3>provisioning failed: no user-data\n"


def test_tracebacks_reach_the_journal_and_stderr(
    journal: tuple[socket.socket, agent_log.Logger, dict[str, str]], capsys: pytest.CaptureFixture[str]
) -> None:
    s, logger, _ = journal
    try:
        raise KeyError("boom")
    except KeyError:
        logger.exception("unexpected error")
        agent_log.setup(agent_log.INFO, journal=False)
        logger.exception("unexpected error")
    msg = parse_entry(s.recv(65536))["MESSAGE"]
    assert msg.startswith("unexpected error\nTraceback (most recent call last):")
    assert "KeyError: 'boom'" in msg
    err = capsys.readouterr().err
    assert "guest-agent: error: unexpected error\nTraceback (most recent call last):" in err
    assert "KeyError: 'boom'" in err


def test_a_bad_format_never_raises(capsys: pytest.CaptureFixture[str]) -> None:
    agent_log.setup(agent_log.INFO, journal=False)
    try:
        agent_log.logger("guest_agent.test").info("%d files", "x")
    finally:
        agent_log.setup(agent_log.WARNING, journal=False)
    assert "%d files ('x',)" in capsys.readouterr().err
