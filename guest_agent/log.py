"""Logging: structured journald entries under systemd, plain lines on stderr otherwise.

Fields are passed with `extra={"GUEST_AGENT_STAGE": ..., "MESSAGE_ID": ...}`; every
upper-case `extra` key becomes a journal field, so `journalctl GUEST_AGENT_STAGE=fetch`
and `journalctl MESSAGE_ID=<id>` find them.  User-data content is never logged: only
sizes and sha256 digests.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

IDENTIFIER = "guest-agent"

# Stable MESSAGE_IDs (journalctl MESSAGE_ID=...); never change them.
MSG_APPLIED = "e20ce18880bb4dccb24bb5e5ddd79601"  # user-data applied, files written
MSG_FAILED = "26614c3b396f4640916755ec935fe12f"  # provisioning failed (reason in GUEST_AGENT_REASON)
MSG_READY_REPORTED = "4bc698d58ad94277837e3bc48f1efa3d"  # the fabric acknowledged Ready
MSG_FAILURE_REPORTED = "c82d5f8d6397456ab0b7cce2794bf8ff"  # the fabric acknowledged NotReady
MSG_TIMELINE = "a96ea9c759f2401680668112294e1001"  # the summary of stage durations

_PRIORITY = {logging.DEBUG: "7", logging.INFO: "6", logging.WARNING: "4", logging.ERROR: "3", logging.CRITICAL: "2"}
_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def journal_fields(record: logging.LogRecord) -> dict[str, str]:
    """The journal fields of a record: upper-case `extra` keys, stringified."""
    return {k: str(v) for k, v in record.__dict__.items() if k not in _STD_ATTRS and k.isupper()}


class JournalHandler(logging.Handler):
    """Sends each record with `systemd.journal.send` (native protocol, one datagram)."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__()
        from systemd import journal  # lazy: ~17 ms, only when running under journald

        self._send = journal.send
        self.fields = fields  # added to every record (e.g. GUEST_AGENT_PROVIDER once known)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            self._send(
                msg,
                PRIORITY=_PRIORITY.get(record.levelno, "6"),
                SYSLOG_IDENTIFIER=IDENTIFIER,
                CODE_FILE=record.pathname,
                CODE_LINE=record.lineno,
                CODE_FUNC=record.funcName,
                **self.fields,
                **journal_fields(record),
            )
        except Exception:
            self.handleError(record)


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
        return f"{line} [{tail}]" if tail else line


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
    handler: logging.Handler
    try:
        handler = JournalHandler(fields) if journal else StderrHandler(fields)
    except ImportError:
        handler = StderrHandler(fields)
    logger = logging.getLogger("guest_agent")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False
    return fields


def fields(**kv: Any) -> dict[str, Any]:
    """`extra=` helper: fields(stage="fetch") -> {"GUEST_AGENT_STAGE": "fetch"}."""
    return {f"GUEST_AGENT_{k.upper()}": v for k, v in kv.items()}
