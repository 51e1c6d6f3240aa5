"""The logging front end: structured journal entries over journald's native protocol, received on a
real socket (tests/test_journald.py reads what a real journald stores), and the stderr lines."""

from __future__ import annotations

import logging
import socket
import struct
import sys
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


Journal = tuple[socket.socket, logging.Logger, dict[str, str]]


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[tuple[socket.socket, logging.Logger, dict[str, str]]]:
    path = str(tmp_path / "journal.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    fields = agent_log.setup(agent_log.DEBUG, journal=True, socket_path=path)
    yield s, agent_log.logger("guest_agent.test-journal"), fields
    agent_log.setup(agent_log.WARNING, journal=False)
    s.close()


def test_entry_carries_structured_fields(journal: Journal) -> None:
    s, logger, fields = journal
    fields["GUEST_AGENT_PROVIDER"] = "azure"
    extra = {"MESSAGE_ID": agent_log.MSG_APPLIED, **agent_log.fields(stage="ready", elapsed_ms=1.5)}
    line = sys._getframe().f_lineno + 1
    logger.info("user-data applied", extra=extra)
    e = parse_entry(s.recv(65536))
    assert e["MESSAGE"] == "user-data applied"
    assert e["MESSAGE_ID"] == agent_log.MSG_APPLIED
    assert e["PRIORITY"] == "6"
    assert e["SYSLOG_IDENTIFIER"] == "guest-agent"
    assert e["GUEST_AGENT_PROVIDER"] == "azure"
    assert e["GUEST_AGENT_STAGE"] == "ready"
    assert e["GUEST_AGENT_ELAPSED_MS"] == "1.5"
    assert e["CODE_FUNC"] == "test_entry_carries_structured_fields"
    assert (e["CODE_FILE"], e["CODE_LINE"]) == (__file__, str(line))


def test_multiline_values_use_the_length_prefixed_form(
    journal: Journal,
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


def test_lowercase_extra_keys_are_not_fields(caplog: pytest.LogCaptureFixture) -> None:
    agent_log.logger("guest_agent.test").warning("x", extra={"GUEST_AGENT_STAGE": "fetch", "private": "no", "N": 1})
    assert agent_log.record_fields(caplog.records[-1]) == {"GUEST_AGENT_STAGE": "fetch", "N": "1"}


def test_below_the_level_nothing_is_written(capsys: pytest.CaptureFixture[str]) -> None:
    agent_log.setup(agent_log.INFO, journal=False)
    try:
        agent_log.logger("guest_agent.test").debug("hidden %s", "x")
        agent_log.logger("guest_agent.test").info("shown %d%%", 5, extra=agent_log.fields(stage="fetch"))
    finally:
        agent_log.setup(agent_log.WARNING, journal=False)
    assert capsys.readouterr().err == "guest-agent: info: shown 5% [stage=fetch]\n"


def test_outcomes_also_go_to_stdout_for_the_console(journal: Journal, capsys: pytest.CaptureFixture[str]) -> None:
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


def test_tracebacks_reach_the_journal_and_stderr(journal: Journal, capsys: pytest.CaptureFixture[str]) -> None:
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


@pytest.mark.parametrize("journal", [False, True], ids=["stderr", "journal"])
def test_a_bad_format_never_raises(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, journal: bool
) -> None:
    """logging's own report of a handler error: the message and its arguments on stderr.  (Not
    propagated to pytest's handler, which fails the test on a bad format.)"""
    monkeypatch.setattr(logging.getLogger(agent_log.ROOT), "propagate", False)
    agent_log.setup(agent_log.INFO, journal=journal, socket_path=str(tmp_path / "absent.sock"))
    try:
        agent_log.logger("guest_agent.test").info("%d files", "x")
    finally:
        agent_log.setup(agent_log.WARNING, journal=False)
    err = capsys.readouterr().err
    assert "Message: '%d files'\nArguments: ('x',)" in err


def test_levels_map_to_syslog_priorities() -> None:
    levels = [logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL, 5, 25, 45]
    assert [agent_log.priority(n) for n in levels] == ["7", "6", "4", "3", "2", "7", "6", "3"]


def test_the_agents_loggers_are_the_standard_librarys() -> None:
    """One handler on the `guest_agent` logger serves every module's logger (its children)."""
    from guest_agent import boot, notify

    assert isinstance(boot.log, logging.Logger) and notify.log.parent is logging.getLogger(agent_log.ROOT)
    fields = agent_log.setup(agent_log.INFO, journal=False)
    try:
        top = logging.getLogger(agent_log.ROOT)
        assert [type(h) for h in top.handlers] == [agent_log.StderrHandler] and top.level == logging.INFO
        agent_log.setup(agent_log.DEBUG, journal=False)
        assert len(top.handlers) == 1 and top.level == logging.DEBUG and fields == {}
    finally:
        agent_log.setup(agent_log.WARNING, journal=False)
