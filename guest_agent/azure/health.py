"""The wireserver health client: one report loop over the JSON and XML endpoints (wire.py).

The client tries JSON first; 400, 404 or 405 means this host has no JSON endpoint, so it falls
back to the goal state + XML flow and remembers which flavour worked for later reports.

There is no goal-state prefetch: only the XML flow gained from it, not the JSON flow every
current host offers (docs/benchmarks.md, `python -m bench.report`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from guest_agent import httpio
from guest_agent.azure.wire import (
    DEFAULT_AGENT_NAME,
    GOAL_STATE_PATH,
    JSON_HEALTH_PATH,
    MS_VERSION,
    NOT_READY,
    PROVISIONING_FAILED,
    XML_HEALTH_PATH,
    GoalState,
    GoalStateIncomplete,
    build_health_json,
    build_health_xml,
    parse_goal_state,
)
from guest_agent.errors import FabricError
from guest_agent.log import logger
from guest_agent.transport import Backoff, Deadline, Retry, budget_s, retry_or_raise, retry_until, urandom_unit

log = logger("guest_agent.azure.health")

FLAVOUR_JSON = "json"
FLAVOUR_XML = "xml"

OK_STATUS = frozenset({200, 201, 202})  # WALinuxAgent OK_CODES; the JSON endpoint answers 201
THROTTLE_STATUS = frozenset({403, 429, 503})  # WALinuxAgent THROTTLE_CODES; JSON 503 = "GoalState is not ready yet"
JSON_ABSENT_STATUS = frozenset({400, 404, 405})  # no JSON endpoint on this host: use the XML flow
GONE_STATUS = 410  # stale goal state / container (WALinuxAgent ResourceGoneError): refetch and repost

# "In some environments a few goal state requests return a missing RoleInstance" (WALinuxAgent
# _GET_GOAL_STATE_MAX_ATTEMPTS = 6, 0.5 s apart; PR #2030).
ROLE_INSTANCE_READS = 6
ROLE_INSTANCE_RETRY_S = 0.5
MAX_BODY_BYTES = 256 * 1024  # a goal state is ~2 KiB; never buffer an unbounded answer from the host

# Fast first retries (every request is on the critical path of pod start), capped at 2 s.
DEFAULT_BACKOFF = Backoff(initial_s=0.25, max_s=2.0, retry_after_max_s=30.0)


@dataclass(frozen=True, slots=True)
class ReportResult:
    """An acknowledged report."""

    state: str  # Ready | NotReady
    flavour: str  # json | xml: the endpoint that acknowledged
    status: int  # its HTTP status
    round_trips: int  # HTTP requests this report made
    elapsed_s: float


def _retryable(status: int) -> bool:
    return status in THROTTLE_STATUS or status >= 500 or status == GONE_STATUS


class _Tally:
    """What one report has done so far: HTTP requests, goal states without a role instance,
    stale-goal-state answers (the first refetch is immediate, later ones back off)."""

    __slots__ = ("gone", "requests", "role_reads")

    def __init__(self) -> None:
        self.requests = self.role_reads = self.gone = 0


class WireserverClient:
    """Reports health to one wireserver."""

    def __init__(
        self,
        base_url: str,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = urandom_unit,
        backoff: Backoff = DEFAULT_BACKOFF,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 10.0,
        agent_name: str = DEFAULT_AGENT_NAME,
        wall_clock: Callable[[], float] = time.time,
        on_retry: Callable[[str], object] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.on_retry = on_retry
        self.target = httpio.split_url(self.base_url)
        self.clock = clock
        self.sleep = sleep
        self.rand = rand
        self.backoff = backoff
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.agent_name = agent_name
        self.wall_clock = wall_clock
        self.flavour: str | None = None  # learnt on the first acknowledged report
        self.goal_state: GoalState | None = None  # kept for the next XML report

    # -- requests

    def _send(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        deadline: Deadline,
        tally: _Tally,
        body: bytes | None = None,
    ) -> httpio.Response:
        tally.requests += 1
        what = f"{method} {path.split('?')[0]}"
        try:
            return httpio.exchange(
                method,
                httpio.Target(self.target.host, self.target.port, self.target.path.rstrip("/") + path),
                headers={"User-Agent": self.agent_name, **headers},
                body=body,
                budget_s=budget_s(deadline, self.connect_timeout_s, self.read_timeout_s),
                connect_timeout_s=self.connect_timeout_s,
                max_body=MAX_BODY_BYTES,
            )
        except Retry as r:
            raise Retry(f"{what}: {r.reason}") from None
        except httpio.ResponseTooLarge:
            raise Retry(f"{what}: the answer is larger than {MAX_BODY_BYTES} bytes") from None

    def _raise_for(self, resp: httpio.Response, what: str) -> Retry:
        """Throttles, 5xx and 410 are retried (with Retry-After); any other status is final."""
        return retry_or_raise(
            resp,
            what,
            retry_status=_retryable,
            refused=lambda reason: FabricError(
                f"the wireserver rejected {what}", status=resp.status, detail=reason, endpoint=self.base_url
            ),
            now=self.wall_clock(),
        )

    # -- goal state

    def _read_goal_state(self, deadline: Deadline, tally: _Tally) -> GoalState:
        resp = self._send(
            "GET",
            GOAL_STATE_PATH,
            headers={"x-ms-version": MS_VERSION, "x-ms-agent-name": self.agent_name},
            deadline=deadline,
            tally=tally,
        )
        if resp.status != 200:
            raise self._raise_for(resp, "the goal-state request")
        try:
            gs = parse_goal_state(resp.body)
        except GoalStateIncomplete as exc:
            tally.role_reads += 1
            if tally.role_reads >= ROLE_INSTANCE_READS:
                raise FabricError(exc.reason, reads=tally.role_reads, endpoint=self.base_url) from None
            raise Retry(exc.reason, retry_after_s=ROLE_INSTANCE_RETRY_S) from None
        self.goal_state = gs
        return gs

    def _loop(self, attempt: Callable[[], ReportResult], what: str, deadline: Deadline, tally: _Tally) -> ReportResult:
        return retry_until(
            attempt,
            what=what,
            deadline=deadline,
            backoff=self.backoff,
            sleep=self.sleep,
            rand=self.rand,
            on_retry=self.on_retry,
            on_deadline=lambda last: FabricError(
                f"the wireserver did not acknowledge {what} before the deadline",
                last_error=last,
                endpoint=self.base_url,
                round_trips=tally.requests,
                deadline_s=deadline.seconds,
            ),
        )

    # -- reports

    def report(self, state: str, *, description: str | None = None, deadline: Deadline) -> ReportResult:
        """Post Ready, or NotReady/ProvisioningFailed with `description`, until acknowledged or `deadline`.

        Raises FabricError when the wireserver refuses the report (a 4xx that is neither
        "no JSON endpoint", throttling nor a stale goal state) or never acknowledges it in time.
        """
        substatus = PROVISIONING_FAILED if state == NOT_READY else None
        if state == NOT_READY and description is None:
            description = ""
        json_body = build_health_json(state, substatus, description)  # validates state early
        start = self.clock()
        tally = _Tally()

        def done(flavour: str, status: int) -> ReportResult:
            self.flavour = flavour
            return ReportResult(state, flavour, status, tally.requests, self.clock() - start)

        def attempt() -> ReportResult:
            if self.flavour != FLAVOUR_XML:
                resp = self._send(
                    "POST",
                    JSON_HEALTH_PATH,
                    headers={"Content-Type": "application/json", "x-ms-guest-agent-name": self.agent_name},
                    body=json_body,
                    deadline=deadline,
                    tally=tally,
                )
                if resp.status in OK_STATUS:
                    return done(FLAVOUR_JSON, resp.status)
                if resp.status not in JSON_ABSENT_STATUS or self.flavour is not None:
                    raise self._raise_for(resp, "the JSON health report")
                log.info("wireserver has no JSON health endpoint (HTTP %d): using goal state + XML", resp.status)
                self.flavour = FLAVOUR_XML
            gs = self.goal_state or self._read_goal_state(deadline, tally)
            resp = self._send(
                "POST",
                XML_HEALTH_PATH,
                headers={
                    "Content-Type": "text/xml; charset=utf-8",
                    "x-ms-version": MS_VERSION,
                    "x-ms-agent-name": self.agent_name,
                },
                body=build_health_xml(gs, state, substatus, description),
                deadline=deadline,
                tally=tally,
            )
            if resp.status in OK_STATUS:
                return done(FLAVOUR_XML, resp.status)
            if resp.status == GONE_STATUS or (resp.status == 400 and b"InvalidContainerConfiguration" in resp.body):
                # Stale incarnation or container (live migration, WALinuxAgent PR #1299): read it again.
                # The first refetch is immediate; if the host keeps saying so, back off like any retry.
                self.goal_state = None
                tally.gone += 1
                raise Retry(f"the XML health report: HTTP {resp.status} (stale goal state)", immediate=tally.gone == 1)
            raise self._raise_for(resp, "the XML health report")

        result = self._loop(attempt, f"the {state} report", deadline, tally)
        log.info(
            "reported %s to the wireserver (%s endpoint, HTTP %d, %d round trips, %.0f ms)",
            state,
            result.flavour,
            result.status,
            result.round_trips,
            result.elapsed_s * 1000,
        )
        return result
