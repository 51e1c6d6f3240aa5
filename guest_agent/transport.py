"""The retry loop shared by every metadata client and the wireserver: deadlines, jittered
backoff, Retry-After, and the classification of an HTTP status into "retry" or "fail".

The exchange itself (socket, bounds, faults) is in httpio.py.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from guest_agent.entropy import random_bytes
from guest_agent.errors import AgentError, MetadataUnavailable
from guest_agent.log import logger

T = TypeVar("T")


class Answer(Protocol):
    """What the retry classification reads of an HTTP answer (httpio.Response)."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> dict[str, str]: ...
    @property
    def body(self) -> bytes: ...


log = logger("guest_agent.transport")

# Early-boot "not yet" answers worth retrying (cloud-init imds.py, ignition: 404/410/429 and 5xx).
RETRY_STATUS = frozenset({404, 408, 410, 429, 500, 502, 503, 504})


def urandom_unit() -> float:
    """A uniform float in [0, 1) from the kernel's CRNG: no `random` import (~2 ms) on the
    boot path, no shared seed between VMs booted from one image, and no wait for the CRNG to be
    seeded (guest_agent/entropy.py)."""
    return int.from_bytes(random_bytes(7), "big") / float(1 << 56)


class Deadline:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.seconds = seconds
        self.at = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock())

    def expired(self) -> bool:
        return self.clock() >= self.at


@dataclass(frozen=True, slots=True)
class Backoff:
    """Retry delays: the first cap, the largest cap, and the most of a server's Retry-After we honour."""

    initial_s: float = 0.1
    max_s: float = 2.0
    retry_after_max_s: float = 30.0

    def delay(
        self, attempt: int, retry_after_s: float | None = None, rand: Callable[[], float] = urandom_unit
    ) -> float:
        """Delay before retry number `attempt` (1-based): full jitter over a doubling cap.

        `rand()` in [0, 1) scales the cap min(initial_s * 2^(attempt-1), max_s) ("full jitter",
        AWS Architecture Blog, "Exponential Backoff And Jitter"), so a fleet that failed together
        does not retry together.  A server's Retry-After (capped at retry_after_max_s) is waited
        out first and the jitter comes on top, spanning the larger of the cap and the Retry-After
        itself (at most max_s): the request is never early, and 200 VMs told `Retry-After: 1`
        come back spread over a second, not in one millisecond (Azure IMDS allows 5 requests/s).
        """
        cap = float(min(self.initial_s * 2.0 ** (attempt - 1), self.max_s))
        unit = min(max(rand(), 0.0), 1.0)
        if retry_after_s is None:
            return cap * unit
        wait = min(retry_after_s, self.retry_after_max_s)
        return wait + unit * max(cap, min(wait, self.max_s))


class Retry(Exception):
    """Raised by an attempt: worth trying again (after `retry_after_s` if the server said so)."""

    def __init__(self, reason: str, *, retry_after_s: float | None = None, immediate: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.immediate = immediate  # our own decision (e.g. refetch a stale goal state), not a server's


# ~31 years of seconds: a longer delay (more digits, or a date that far away) is not one anyone means.
RETRY_AFTER_MAX_DIGITS = 9
RETRY_AFTER_MAX_S = 10**RETRY_AFTER_MAX_DIGITS - 1
RETRY_AFTER_MAX_DATE_CHARS = 64  # an HTTP-date is 24-30 characters; longer text is not parsed


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After (RFC 9110 §10.2.3): delta-seconds (ASCII digits only) or an HTTP-date.

    The date is read by `email.utils.parsedate_to_datetime` (RFC 5322 dates: IMF-fixdate, and
    the obsolete RFC 850 and asctime forms RFC 9110 asks a recipient to accept); one without a
    zone counts as GMT, as HTTP-dates are.  `now` is wall-clock time (an HTTP-date is absolute);
    a date in the past is no wait.  Anything else, including digits `str.isdigit` accepts but
    `int` refuses ('²') and delays past RETRY_AFTER_MAX_S, is ignored (None): the caller's own
    backoff applies, and Backoff caps what is honoured.
    """
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value) if len(value) <= RETRY_AFTER_MAX_DIGITS else None
    if len(value) > RETRY_AFTER_MAX_DATE_CHARS:
        return None
    # Imported here: a date is rare (IMDS and the wireserver send seconds, if anything), and the
    # email package stays off the boot path.
    import datetime
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (ValueError, TypeError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    wait = max(0.0, when.timestamp() - (time.time() if now is None else now))
    return wait if wait <= RETRY_AFTER_MAX_S else None


def retry_until(
    attempt: Callable[[], T],
    *,
    what: str,
    deadline: Deadline,
    backoff: Backoff,
    sleep: Callable[[float], None] = time.sleep,
    on_deadline: Callable[[str], AgentError] | None = None,
    rand: Callable[[], float] = urandom_unit,
    on_retry: Callable[[str], object] | None = None,
) -> T:
    """Call `attempt` until it returns, raises a non-`Retry` error, or the deadline passes.

    Logs the first failure and every change of failure reason, not every attempt.  `on_retry`
    gets a one-line status after every failed attempt (the agent's `STATUS=`: what it retries,
    the last reason, the attempt and the time left).
    """
    n = 0
    last: str | None = None
    while True:
        n += 1
        try:
            return attempt()
        except Retry as r:
            if r.reason != last:
                log.warning("%s: %s (attempt %d, retrying until the deadline)", what, r.reason, n)
                last = r.reason
            delay = 0.0 if r.immediate else backoff.delay(n, r.retry_after_s, rand)
            if on_retry is not None:
                on_retry(f"{what}: {r.reason} (attempt {n}, retrying, {deadline.remaining():.0f} s left)")
            if delay >= deadline.remaining():
                if on_deadline is not None:
                    raise on_deadline(r.reason) from None
                raise MetadataUnavailable(
                    f"{what} failed until the deadline", last_error=r.reason, attempts=n, deadline_s=deadline.seconds
                ) from None
            sleep(delay)


def budget_s(deadline: Deadline, connect_s: float, read_s: float) -> float:
    """One exchange's total time (connect + answer), never past the stage's deadline."""
    return min(deadline.remaining(), connect_s + read_s)


def http_retry_reason(status: int, body: bytes) -> str:
    snippet = body[:80].decode("utf-8", "replace").strip()
    return f"HTTP {status}" + (f" ({snippet})" if snippet else "")


def retry_or_raise(
    resp: Answer,
    what: str,
    *,
    retry_status: Callable[[int], bool],
    refused: Callable[[str], AgentError],
    now: float | None = None,
) -> Retry:
    """For a non-success answer: a `Retry` (with the server's Retry-After) to raise when
    `retry_status(status)`, else raise `refused(reason)`: the one classification used by the
    metadata clients and the wireserver."""
    reason = http_retry_reason(resp.status, resp.body)
    if retry_status(resp.status):
        return Retry(f"{what}: {reason}", retry_after_s=parse_retry_after(resp.headers.get("retry-after"), now))
    raise refused(reason)
