"""The stage timeline: CLOCK_MONOTONIC start/end of every stage of a run.

`time.monotonic()` is CLOCK_MONOTONIC on Linux: seconds since boot (minus suspend), the
same clock as the kernel's log timestamps and systemd's *TimestampMonotonic, so the
figures line up with `journalctl -o short-monotonic` and `systemd-analyze`.

Each stage's start and end and each mark is also raised as the audit event AUDIT_EVENT
(`sys.audit`, PEP 578): ("start" | "end" | "mark", name).  Nothing listens in the agent; a hook
(`sys.addaudithook`) sees the run from inside, e.g. which modules are loaded when the route
appears (tests/test_boot_imports.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from guest_agent.errors import AgentError
from guest_agent.log import fields, logger

log = logger("guest_agent.timeline")

AUDIT_EVENT = "guest_agent.timeline"


class Stage:
    """One stage of a run."""

    __slots__ = ("end", "error", "name", "ok", "start")

    def __init__(self, name: str, start: float) -> None:
        self.name = name
        self.start = start
        self.end: float | None = None
        self.ok: bool | None = None
        self.error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "start": self.start, "end": self.end, "ok": self.ok, "error": self.error}

    @property
    def ms(self) -> float:
        return round(((self.end or self.start) - self.start) * 1000, 3)


def process_start_monotonic() -> float | None:
    """When this process was created (before the interpreter started), in seconds since boot.

    Field 22 of /proc/self/stat is the start time in clock ticks of CLOCK_BOOTTIME, which
    equals CLOCK_MONOTONIC on a VM that was never suspended; tick resolution (10 ms).
    """
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        return int(stat.rsplit(b")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class Timeline:
    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, status: Callable[[str], object] | None = None
    ) -> None:
        self.clock = clock
        self.status = status
        self.process_start = process_start_monotonic()
        self.start = clock()
        self.stages: list[Stage] = []
        self.marks: dict[str, float] = {}
        self.counts: dict[str, int] = {}  # e.g. user-data entries skipped as CAA skips them

    def stage(self, name: str, doing: str = "") -> Running:
        """`with tl.stage("fetch", ...) as st:` times the block as one stage.  `doing` says what the
        stage does or waits for: `STATUS=network: waiting for a route to 169.254.169.254` in
        `systemctl status`."""
        return Running(self, name, doing)

    def mark(self, name: str) -> None:
        """A point event (e.g. READY=1 sent)."""
        self.marks[name] = self.clock()
        sys.audit(AUDIT_EVENT, "mark", name)

    def count(self, name: str, n: int) -> None:
        """A tally for the run (kept in timeline.json beside the stages)."""
        self.counts[name] = self.counts.get(name, 0) + n

    def durations_ms(self) -> dict[str, float]:
        return {s.name: s.ms for s in self.stages if s.end is not None}

    def to_dict(self) -> dict[str, Any]:
        return {
            "clock": "CLOCK_MONOTONIC",
            "process_start": self.process_start,
            "agent_start": self.start,
            "stages": [s.to_dict() for s in self.stages],
            "marks": self.marks,
            "counts": self.counts,
        }

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n").encode()


class Running:
    """One stage while its block runs (the context manager `Timeline.stage` returns)."""

    __slots__ = ("doing", "name", "stage", "timeline")
    stage: Stage  # from __enter__ on

    def __init__(self, timeline: Timeline, name: str, doing: str) -> None:
        self.timeline = timeline
        self.name = name
        self.doing = doing

    def __enter__(self) -> Stage:
        tl, name = self.timeline, self.name
        st = self.stage = Stage(name, tl.clock())
        tl.stages.append(st)
        sys.audit(AUDIT_EVENT, "start", name)
        what = f"{name}: {self.doing}" if self.doing else name
        if tl.status is not None:
            tl.status(what)
        log.info("[started] %s", what, extra=fields(stage=name))
        return st

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        st, name = self.stage, self.name
        st.end, st.ok = self.timeline.clock(), exc is None
        sys.audit(AUDIT_EVENT, "end", name)
        if exc is None:
            log.info("[finished] %s (%.1f ms)", name, st.ms, extra=fields(stage=name, elapsed_ms=st.ms))
            return
        if isinstance(exc, AgentError):
            if exc.stage is None:
                exc.stage = name
            st.error = exc.reason
        else:
            st.error = type(exc).__name__
        log.info("[failed] %s (%.1f ms): %s", name, st.ms, st.error, extra=fields(stage=name, elapsed_ms=st.ms))
