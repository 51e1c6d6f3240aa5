"""Logging: the standard `logging` module, with structured journald entries under systemd and
plain lines on stderr otherwise.

Each module takes `log = logger("guest_agent.<module>")` (a `logging.Logger`) and calls
`log.info(msg, *args, extra=...)` (also debug, warning, error, exception).  Fields are passed
with `extra={"GUEST_AGENT_STAGE": ..., "MESSAGE_ID": ...}`; every upper-case `extra` key becomes
a journal field, so `journalctl GUEST_AGENT_STAGE=fetch` and `journalctl MESSAGE_ID=<id>` find
them.  `setup` puts one handler on the `guest_agent` logger: `JournalHandler` (journald's native
protocol, encoded here: no systemd-python build) or `StderrHandler`.  User-data content is never
logged: only sizes and sha256 digests.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from typing import Any, TextIO

IDENTIFIER = "guest-agent"

# Stable MESSAGE_IDs (journalctl MESSAGE_ID=...); never change them.
MSG_APPLIED = "e20ce18880bb4dccb24bb5e5ddd79601"  # user-data applied, files written
MSG_FAILED = "26614c3b396f4640916755ec935fe12f"  # provisioning failed (reason in GUEST_AGENT_REASON)
MSG_READY_REPORTED = "4bc698d58ad94277837e3bc48f1efa3d"  # the fabric acknowledged Ready
MSG_FAILURE_REPORTED = "c82d5f8d6397456ab0b7cce2794bf8ff"  # the fabric acknowledged NotReady
MSG_TIMELINE = "a96ea9c759f2401680668112294e1001"  # the summary of stage durations
# catalog/guest-agent.catalog explains each of them (`journalctl -x`); tests/test_catalog.py keeps
# the two in step.

# The outcomes an operator without a login must see on the serial console (Azure boot
# diagnostics, the EC2 console): under journald these are also written as one plain line to
# stdout, which the unit connects to journal+console.
CONSOLE_IDS = frozenset({MSG_APPLIED, MSG_FAILED, MSG_READY_REPORTED, MSG_FAILURE_REPORTED})

DEBUG, INFO, WARNING, ERROR = logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR
ROOT = "guest_agent"  # the logger every module's logger is a child of; `setup` configures it
JOURNAL_SOCKET = "/run/systemd/journal/socket"


def logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


def priority(levelno: int) -> str:
    """The syslog(3) priority of a logging level: 2 critical, 3 error, 4 warning, 6 info, 7 debug."""
    for floor, prio in ((logging.CRITICAL, "2"), (ERROR, "3"), (WARNING, "4"), (INFO, "6")):
        if levelno >= floor:
            return prio
    return "7"


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """The journal fields a record carries: the upper-case keys of its `extra=`, as strings.
    (LogRecord's own attributes are all lower or mixed case.)"""
    return {k: str(v) for k, v in vars(record).items() if k.isupper()}


def encode_journal_entry(fields: dict[str, str]) -> bytes:
    """journald's native protocol (systemd.journal-fields(7), "Native Journal Protocol").

    One `KEY=value\n` per field; a value containing a newline is sent as `KEY\n`, its
    length as a little-endian uint64, the bytes, then `\n`.
    """
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Sends each record to journald as one datagram with its structured fields: MESSAGE (with
    the traceback of `exception()` below the message), PRIORITY, SYSLOG_IDENTIFIER, CODE_FILE,
    CODE_LINE and CODE_FUNC from the LogRecord, the `fields` given to every record, and the
    record's own."""

    def __init__(self, fields: dict[str, str], socket_path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.fields = fields  # added to every record (e.g. GUEST_AGENT_PROVIDER once known)
        self.socket_path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    def entry(self, record: logging.LogRecord) -> dict[str, str]:
        return {
            "MESSAGE": self.format(record),
            "PRIORITY": priority(record.levelno),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            **self.fields,
            **record_fields(record),
        }

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = self.entry(record)
            prio = entry["PRIORITY"]
            try:
                self.sock.sendto(encode_journal_entry(entry), self.socket_path)
            except OSError:
                # journald gone or the entry too large for a datagram: never lose the line (nor
                # the traceback, which the message carries).
                _write(sys.stderr, f"<{prio}>{entry['MESSAGE']}\n")
            if entry.get("MESSAGE_ID") in CONSOLE_IDS:
                # The outcome as one plain line on stdout (`StandardOutput=journal+console`):
                # journald forwards the unit's stream, not native entries, to the console.  In the
                # journal it is a second, field-less copy of the entry; `<N>` sets its priority.
                _write(sys.stdout, f"<{prio}>{record.getMessage()}\n")
        except Exception:
            self.handleError(record)  # a bad format is a bug, but logging must not end the run

    def close(self) -> None:
        self.sock.close()
        super().close()


class LineFormatter(logging.Formatter):
    """`guest-agent: info: message [stage=fetch ...]`, the traceback on the lines below."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        extra = {**self.fields, **record_fields(record)}
        extra.pop("MESSAGE_ID", None)
        tail = " ".join(f"{k.removeprefix('GUEST_AGENT_').lower()}={v}" for k, v in extra.items())
        line = f"guest-agent: {record.levelname.lower()}: {record.getMessage()}"
        line = f"{line} [{tail}]" if tail else line
        if record.exc_info:  # an internal error: the traceback is what a bug report needs
            line += "\n" + self.formatException(record.exc_info)
        return line


class StderrHandler(logging.Handler):
    """Human lines with the structured fields appended, for terminals and tests.  Writes to the
    `sys.stderr` of the moment (as logging's last-resort handler does), so a test's capture of
    stderr sees the lines."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        self.setFormatter(LineFormatter(fields))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _write(sys.stderr, self.format(record) + "\n")
        except Exception:
            self.handleError(record)


def _write(stream: TextIO | None, text: str) -> None:
    if stream is None:  # no such stream (pythonw, or closed by the caller): nothing else to tell
        return
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError):
        pass  # closed, or the other end gone


def under_journald() -> bool:
    """True when stderr is connected to the journal (systemd sets JOURNAL_STREAM=dev:inode)."""
    stream = os.environ.get("JOURNAL_STREAM")
    if not stream:
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def setup(level: int = INFO, *, journal: bool | None = None, socket_path: str = JOURNAL_SOCKET) -> dict[str, str]:
    """Where and from which level the agent's records go: one handler on the `guest_agent`
    logger, replacing the one set before; returns the dict of fields added to every record.
    Before `setup`, warnings and errors reach stderr through logging's last-resort handler."""
    fields: dict[str, str] = {}
    if journal is None:
        journal = under_journald()
    top = logging.getLogger(ROOT)
    for old in list(top.handlers):
        top.removeHandler(old)
        old.close()
    top.addHandler(JournalHandler(fields, socket_path) if journal else StderrHandler(fields))
    top.setLevel(level)
    return fields


def fields(**kv: Any) -> dict[str, Any]:
    """`extra=` helper: fields(stage="fetch") -> {"GUEST_AGENT_STAGE": "fetch"}."""
    return {f"GUEST_AGENT_{k.upper()}": v for k, v in kv.items()}
