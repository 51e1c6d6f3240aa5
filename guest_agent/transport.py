"""HTTP plumbing shared by every metadata client: a proxy-free session and a retry loop.

`requests` costs ~75 ms to import, more than the interpreter itself, so nothing here
imports it at module level: `preload()` starts the import in a thread at agent start,
where it overlaps with reading DMI and waiting for the network.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from guest_agent.errors import AgentError, MetadataUnavailable

if TYPE_CHECKING:
    import requests

log = logging.getLogger("guest_agent.transport")
T = TypeVar("T")

# Early-boot "not yet" answers worth retrying (cloud-init imds.py, ignition: 404/410/429 and 5xx).
RETRY_STATUS = frozenset({404, 408, 410, 429, 500, 502, 503, 504})

_preload_thread: threading.Thread | None = None


def preload() -> None:
    """Import requests and PyYAML in the background; `new_session()` joins the thread.

    On a real boot the agent starts before DHCP has finished, so these ~100 ms of imports
    run while the network wait blocks in poll(); they are off the network-up -> Ready path.
    """
    global _preload_thread
    if _preload_thread is None:

        def _imp() -> None:
            import requests  # noqa: F401
            import yaml  # noqa: F401

        _preload_thread = threading.Thread(target=_imp, name="preload-requests", daemon=True)
        _preload_thread.start()


def new_session() -> requests.Session:
    """A session that never uses a proxy: trust_env off ignores HTTP(S)_PROXY and .netrc
    (WALinuxAgent: "Never use the HTTP proxy for wireserver"; IMDS docs require a bypass)."""
    if _preload_thread is not None:
        _preload_thread.join()
    import requests
    import requests.adapters

    s = requests.Session()
    s.trust_env = False
    s.proxies = {}
    adapter = requests.adapters.HTTPAdapter(max_retries=0, pool_connections=4, pool_maxsize=4)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s


class Deadline:
    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.seconds = seconds
        self.at = clock() + seconds

    def remaining(self) -> float:
        return max(0.0, self.at - self.clock())

    def expired(self) -> bool:
        return self.clock() >= self.at


@dataclass(frozen=True)
class Backoff:
    initial_s: float = 0.1
    max_s: float = 2.0
    retry_after_max_s: float = 30.0

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """Delay before retry number `attempt` (1-based): doubling, capped at max_s.

        A server's Retry-After lengthens the delay (up to retry_after_max_s) but never
        shortens it: `Retry-After: 0` must not turn the loop into a flood (Azure IMDS
        allows 5 requests/s)."""
        backoff = float(min(self.initial_s * 2.0 ** (attempt - 1), self.max_s))
        if retry_after_s is not None:
            return max(backoff, min(retry_after_s, self.retry_after_max_s))
        return backoff


class Retry(Exception):
    """Raised by an attempt: worth trying again (after `retry_after_s` if the server said so)."""

    def __init__(self, reason: str, *, retry_after_s: float | None = None, immediate: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.immediate = immediate  # our own decision (e.g. refetch a stale goal state), not a server's


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Retry-After is delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils  # ~5 ms: only when a server sent an HTTP-date

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now())


def retry_until(
    attempt: Callable[[], T],
    *,
    what: str,
    deadline: Deadline,
    backoff: Backoff,
    sleep: Callable[[float], None] = time.sleep,
    on_deadline: Callable[[str], AgentError] | None = None,
) -> T:
    """Call `attempt` until it returns, raises a non-`Retry` error, or the deadline passes.

    Logs the first failure and every change of failure reason, not every attempt.
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
            delay = 0.0 if r.immediate else backoff.delay(n, r.retry_after_s)
            if delay >= deadline.remaining():
                if on_deadline is not None:
                    raise on_deadline(r.reason) from None
                raise MetadataUnavailable(
                    f"{what} failed until the deadline", last_error=r.reason, attempts=n, deadline_s=deadline.seconds
                ) from None
            sleep(delay)


def timeout_for(deadline: Deadline, connect_s: float, read_s: float) -> tuple[float, float]:
    """Per-request (connect, read) timeouts, never past the deadline."""
    rem = max(deadline.remaining(), 0.001)
    return (min(connect_s, rem), min(read_s, rem))


def http_retry_reason(status: int, body: bytes) -> str:
    snippet = body[:80].decode("utf-8", "replace").strip()
    return f"HTTP {status}" + (f" ({snippet})" if snippet else "")
