"""Logging: structured journald entries under systemd, plain lines on stderr otherwise.

Each module takes `log = logger("guest_agent.<module>")` and calls `log.info(msg, *args,
extra=...)` (also debug, warning, error, exception), as with the standard library's loggers.
Fields are passed with `extra={"GUEST_AGENT_STAGE": ..., "MESSAGE_ID": ...}`; every
upper-case `extra` key becomes a journal field, so `journalctl GUEST_AGENT_STAGE=fetch`
and `journalctl MESSAGE_ID=<id>` find them.  User-data content is never logged: only
sizes and sha256 digests.

Not the standard library's `logging`: one process, one destination and a few dozen entries need
none of its handlers, locks, filters or formatters, and its import (with `traceback`, `string`,
`threading`, `weakref`) and records cost ~20 M instructions on every boot, ~7 % of a whole agent
run (valgrind's callgrind, one `run` against the local fake Azure: 287 M -> 267 M).
"""

from __future__ import annotations

import _socket
import _struct
import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar

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

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_LEVEL_NAMES = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error"}
_PRIORITY = {DEBUG: "7", INFO: "6", WARNING: "4", ERROR: "3"}  # syslog(3) levels


class Record:
    """One log call: its message, level, the caller's place and the journal fields it carries."""

    __slots__ = ("args", "exc_text", "fields", "func", "levelno", "lineno", "msg", "name", "pathname")

    def __init__(self, name: str, levelno: int, msg: str, args: tuple[Any, ...], fields: dict[str, str]) -> None:
        self.name, self.levelno, self.msg, self.args, self.fields = name, levelno, msg, args, fields
        self.exc_text = ""  # the traceback of `exception()`
        self.pathname, self.lineno, self.func = "", 0, ""

    @property
    def levelname(self) -> str:
        return _LEVEL_NAMES.get(self.levelno, "info").upper()

    def message(self) -> str:
        if not self.args:
            return self.msg
        try:
            return self.msg % self.args
        except (TypeError, ValueError):  # a wrong format is a bug, but logging must not end the run
            return f"{self.msg} {self.args!r}"

    def text(self) -> str:
        """The message, and below it the traceback when there is one."""
        return f"{self.message()}\n{self.exc_text}" if self.exc_text else self.message()


def journal_fields(extra: dict[str, Any] | None) -> dict[str, str]:
    """The journal fields of an `extra=` dict: upper-case keys, stringified."""
    return {k: str(v) for k, v in extra.items() if k.isupper()} if extra else {}


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
            out += key.encode() + b"\n" + _struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalWriter:
    """Sends each record to journald as one datagram with its structured fields.

    The native protocol is a few lines over the AF_UNIX socket the interpreter already
    has; `systemd.journal` would cost ~20 ms of imports (~0.5 s under QEMU TCG) on the
    boot's critical path for the same datagram.
    """

    def __init__(self, fields: dict[str, str], socket_path: str = JOURNAL_SOCKET) -> None:
        self.fields = fields  # added to every record (e.g. GUEST_AGENT_PROVIDER once known)
        self.socket_path = socket_path
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)

    def entry(self, record: Record) -> dict[str, str]:
        return {
            "MESSAGE": record.text(),
            "PRIORITY": _PRIORITY.get(record.levelno, "6"),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.func,
            **self.fields,
            **record.fields,
        }

    def write(self, record: Record) -> None:
        try:
            self.sock.sendto(encode_journal_entry(self.entry(record)), self.socket_path)
        except OSError:
            # journald gone or the entry too large for a datagram: never lose the line (nor the
            # traceback, which the message carries).
            _write(sys.stderr, f"<{_PRIORITY.get(record.levelno, '6')}>{record.text()}\n")
        if record.fields.get("MESSAGE_ID") in CONSOLE_IDS:
            # The outcome as one plain line on stdout (`StandardOutput=journal+console`): journald
            # forwards the unit's stream, not native entries, to the console.  In the journal it
            # is a second, field-less copy of the structured entry; `<N>` sets its priority there.
            _write(sys.stdout, f"<{_PRIORITY.get(record.levelno, '6')}>{record.message()}\n")

    def close(self) -> None:
        self.sock.close()


class StderrWriter:
    """Human lines with the structured fields appended, for terminals and tests."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.fields = fields

    def line(self, record: Record) -> str:
        extra = {**self.fields, **record.fields}
        extra.pop("MESSAGE_ID", None)
        tail = " ".join(f"{k.removeprefix('GUEST_AGENT_').lower()}={v}" for k, v in extra.items())
        line = f"guest-agent: {_LEVEL_NAMES.get(record.levelno, 'info')}: {record.message()}"
        line = f"{line} [{tail}]" if tail else line
        if record.exc_text:  # an internal error: the traceback is what a bug report needs
            line += "\n" + record.exc_text.rstrip("\n")
        return line

    def write(self, record: Record) -> None:
        _write(sys.stderr, self.line(record) + "\n")

    def close(self) -> None:
        pass


def _write(stream: Any, text: str) -> None:
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError, AttributeError):
        pass  # no such stream (closed, or None): nothing else to tell


class _State:
    """Where records go: until `setup`, warnings and errors to stderr (as the standard library's
    last-resort handler does), so a library caller still sees them."""

    level = WARNING
    writer: JournalWriter | StderrWriter = StderrWriter({})
    captured: ClassVar[list[list[Record]]] = []


class Logger:
    """`log.info("wrote %s", path, extra=fields(stage="write"))`: %-formatting happens only for
    entries that are written."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def debug(self, msg: str, *args: Any, extra: dict[str, Any] | None = None) -> None:
        self._log(DEBUG, msg, args, extra)

    def info(self, msg: str, *args: Any, extra: dict[str, Any] | None = None) -> None:
        self._log(INFO, msg, args, extra)

    def warning(self, msg: str, *args: Any, extra: dict[str, Any] | None = None) -> None:
        self._log(WARNING, msg, args, extra)

    def error(self, msg: str, *args: Any, extra: dict[str, Any] | None = None) -> None:
        self._log(ERROR, msg, args, extra)

    def exception(self, msg: str, *args: Any, extra: dict[str, Any] | None = None) -> None:
        """An error with the traceback of the exception being handled."""
        self._log(ERROR, msg, args, extra, exc=True)

    def _log(
        self, level: int, msg: str, args: tuple[Any, ...], extra: dict[str, Any] | None, exc: bool = False
    ) -> None:
        if level < _State.level and not _State.captured:
            return
        record = Record(self.name, level, msg, args, journal_fields(extra))
        caller = sys._getframe(2)
        record.pathname, record.lineno, record.func = caller.f_code.co_filename, caller.f_lineno, caller.f_code.co_name
        if exc:
            import traceback  # only on this (internal error) path

            record.exc_text = traceback.format_exc()
        for records in _State.captured:
            records.append(record)
        if level >= _State.level:
            _State.writer.write(record)


def logger(name: str) -> Logger:
    return Logger(name)


def capture() -> _Capture:
    """For tests: every record logged inside the block, whatever the level (and still written)."""
    return _Capture()


class _Capture:
    """`with capture() as records`.  A class, not @contextlib.contextmanager: the boot path does
    without contextlib's import."""

    __slots__ = ("records",)

    def __init__(self) -> None:
        self.records: list[Record] = []

    def __enter__(self) -> list[Record]:
        _State.captured.append(self.records)
        return self.records

    def __exit__(self, *exc: object) -> None:
        _State.captured.remove(self.records)


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
    """Where and from which level records go; returns the dict of fields added to every record."""
    fields: dict[str, str] = {}
    if journal is None:
        journal = under_journald()
    _State.writer.close()
    _State.writer = JournalWriter(fields, socket_path) if journal else StderrWriter(fields)
    _State.level = level
    return fields


def fields(**kv: Any) -> dict[str, Any]:
    """`extra=` helper: fields(stage="fetch") -> {"GUEST_AGENT_STAGE": "fetch"}."""
    return {f"GUEST_AGENT_{k.upper()}": v for k, v in kv.items()}
