"""The agent's error hierarchy and exit codes.

Every failure the agent can report is an `AgentError` carrying a short, fixed,
user-facing `reason` and a dict of `supporting_data` (never secrets or
user-data content).  `cli` renders it in one place: the journal line, the
fabric failure report and the exit code.  Exit codes follow sysexits(3) so the
unit can act on them (`RestartPreventExitStatus=78`).
"""

from __future__ import annotations

import re
from typing import Any

EXIT_OK = 0
EXIT_USAGE = 64  # EX_USAGE: bad command line (argparse)
EXIT_NOINPUT = 66  # EX_NOINPUT: an input file named on the command line (or the last run's timeline) is missing
EXIT_UNAVAILABLE = 69  # EX_UNAVAILABLE: metadata service, network, fabric or TPM unavailable by the deadline
EXIT_SOFTWARE = 70  # EX_SOFTWARE: a bug in the agent (an unexpected exception); nothing else
EXIT_CANTCREAT = 73  # EX_CANTCREAT: a file could not be written safely (I/O error, planted symlink)
EXIT_NOPERM = 77  # EX_NOPERM: the process lacks a privilege it needs (CAP_NET_ADMIN for netns commands)
EXIT_CONFIG = 78  # EX_CONFIG: user-data (or agent config) invalid or disallowed; nothing written

# What `--help` and guest-agent(8) list (tests keep the man page in step).
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_USAGE: "command line usage error",
    EXIT_NOINPUT: "input file missing (user-data file, the last run's timeline)",
    EXIT_UNAVAILABLE: "metadata service, network, fabric or TPM unavailable until the deadline (the unit retries)",
    EXIT_SOFTWARE: "internal error: a bug, with its traceback in the journal",
    EXIT_CANTCREAT: "a file could not be written safely; the previous set of files is kept",
    EXIT_NOPERM: "missing privilege (netns commands need CAP_SYS_ADMIN and CAP_NET_ADMIN)",
    EXIT_CONFIG: "user-data or configuration invalid; nothing written, the unit does not retry",
}


SHOWN = 40  # characters of untrusted text an error message may carry
_INDEX = re.compile(r"\[\d+\]")


def show(text: str, n: int = SHOWN) -> str:
    """A short, printable-ASCII prefix of untrusted text for an error message or log field."""
    shown = ascii(text[:n])[1:-1]
    return shown + "..." if len(text) > n else shown


def field_of(where: str) -> str:
    """`write_files[3].path` -> `write_files[].path`: reasons stay fixed, the index goes in `where`."""
    return _INDEX.sub("[]", where)


class AgentError(Exception):
    """Base class: `reason` is one sentence a user can act on."""

    exit_code = EXIT_SOFTWARE

    def __init__(self, reason: str, **supporting_data: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.supporting_data: dict[str, Any] = supporting_data
        self.stage: str | None = None  # filled in by Timeline when the error crosses a stage

    def describe(self) -> str:
        """One line: reason, then `key=value` supporting data, for logs and fabric reports."""
        parts = [self.reason]
        if self.stage:
            parts.append(f"stage={self.stage}")
        parts.extend(f"{k}={v}" for k, v in self.supporting_data.items())
        return "; ".join(parts)


class ConfigError(AgentError):
    """The agent's own configuration files are invalid."""

    exit_code = EXIT_CONFIG


class UserDataInvalid(AgentError):
    """User-data (or initdata inside it) is malformed or asks for something disallowed."""

    exit_code = EXIT_CONFIG


class MetadataUnavailable(AgentError):
    """The metadata service (or config disk) gave no usable user-data before the deadline."""

    exit_code = EXIT_UNAVAILABLE


class NetworkUnavailable(MetadataUnavailable):
    """No route to the metadata address appeared before the deadline."""


class WriteFailed(AgentError):
    """A config file could not be written safely (I/O error, symlink, bad target)."""

    exit_code = EXIT_CANTCREAT


class InputMissing(AgentError):
    """A file named on the command line (or the last run's timeline) does not exist or cannot be read."""

    exit_code = EXIT_NOINPUT


class NoPermission(AgentError):
    """The process lacks a privilege the command needs."""

    exit_code = EXIT_NOPERM


class FabricError(AgentError):
    """The cloud fabric (Azure wireserver) did not accept a health report."""

    exit_code = EXIT_UNAVAILABLE


class UnhandledError(AgentError):
    """Wraps an unexpected exception so it is still reported through the same path."""

    exit_code = EXIT_SOFTWARE

    def __init__(self, exc: BaseException) -> None:
        super().__init__("unexpected internal error", exception=type(exc).__name__, detail=str(exc)[:200])
