"""Logging: structured journald entries under systemd, plain lines on stderr otherwise.

Fields are passed with `extra={"GUEST_AGENT_STAGE": ..., "MESSAGE_ID": ...}`; every
upper-case `extra` key becomes a journal field, so `journalctl GUEST_AGENT_STAGE=fetch`
and `journalctl MESSAGE_ID=<id>` find them.  User-data content is never logged: only
sizes and sha256 digests.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from typing import Any

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

_PRIORITY = {logging.DEBUG: "7", logging.INFO: "6", logging.WARNING: "4", logging.ERROR: "3", logging.CRITICAL: "2"}
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def journal_fields(record: logging.LogRecord) -> dict[str, str]:
    """The journal fields of a record: upper-case `extra` keys, stringified."""
    return {k: str(v) for k, v in record.__dict__.items() if k not in _STD_ATTRS and k.isupper()}


JOURNAL_SOCKET = "/run/systemd/journal/socket"


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
    """Sends each record to journald as one datagram with its structured fields.

    The native protocol is a few lines over the AF_UNIX socket the interpreter already
    has; `systemd.journal` would cost ~20 ms of imports (~0.5 s under QEMU TCG) on the
    boot's critical path for the same datagram.
    """

    def __init__(self, fields: dict[str, str], socket_path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.fields = fields  # added to every record (e.g. GUEST_AGENT_PROVIDER once known)
        self.socket_path = socket_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def entry(self, record: logging.LogRecord) -> dict[str, str]:
        return {
            "MESSAGE": self.format(record),
            "PRIORITY": _PRIORITY.get(record.levelno, "6"),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            **self.fields,
            **journal_fields(record),
        }

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(encode_journal_entry(self.entry(record)), self.socket_path)
        except OSError:
            # journald gone or the entry too large for a datagram: never lose the line (nor the
            # traceback, which the formatted message carries).
            sys.stderr.write(f"<{_PRIORITY.get(record.levelno, '6')}>{self.format(record)}\n")
        except Exception:
            self.handleError(record)
        if record.__dict__.get("MESSAGE_ID") in CONSOLE_IDS:
            self.console(record)

    def console(self, record: logging.LogRecord) -> None:
        """The outcome as one plain line on stdout (`StandardOutput=journal+console`): journald
        forwards the unit's stream, not native entries, to the console.  In the journal it is a
        second, field-less copy of the structured entry; `<N>` sets its priority there."""
        try:
            sys.stdout.write(f"<{_PRIORITY.get(record.levelno, '6')}>{record.getMessage()}\n")
            sys.stdout.flush()
        except (OSError, ValueError):
            pass  # no stdout: the structured entry is already in the journal

    def close(self) -> None:
        self.sock.close()
        super().close()


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Human lines with the structured fields appended, for terminals and tests."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(sys.stderr)
        self.fields = fields

    def format(self, record: logging.LogRecord) -> str:
        extra = {**self.fields, **journal_fields(record)}
        extra.pop("MESSAGE_ID", None)
        tail = " ".join(f"{k.removeprefix('GUEST_AGENT_').lower()}={v}" for k, v in extra.items())
        line = f"guest-agent: {record.levelname.lower()}: {record.getMessage()}"
        line = f"{line} [{tail}]" if tail else line
        if record.exc_info:  # an internal error: the traceback is what a bug report needs
            line += "\n" + logging.Formatter().formatException(record.exc_info)
        return line


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


def setup(level: int = logging.INFO, *, journal: bool | None = None) -> dict[str, str]:
    """Configure the `guest_agent` logger; returns the dict of fields added to every record."""
    fields: dict[str, str] = {}
    if journal is None:
        journal = under_journald()
    handler: logging.Handler = JournalHandler(fields) if journal else StderrHandler(fields)
    logger = logging.getLogger("guest_agent")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return fields


def fields(**kv: Any) -> dict[str, Any]:
    """`extra=` helper: fields(stage="fetch") -> {"GUEST_AGENT_STAGE": "fetch"}."""
    return {f"GUEST_AGENT_{k.upper()}": v for k, v in kv.items()}
