"""Azure WireServer health reports: tell the fabric the VM is Ready (or why it is not).

Two endpoint flavours exist (azure.md §1.5, §1.6):

* ``json``: ``POST /provisioning/health`` with ``{"state": "Ready"}``: one request, no goal state
  (azure-init since PR #188; Azure/azure-init#186).
* ``xml``: ``GET /machine/?comp=goalstate`` for (incarnation, container id, role instance id),
  then ``POST /machine?comp=health`` with the Health XML (waagent, cloud-init, afterburn, CAA
  azure-ready, the "no agent" doc).

The client tries JSON first; 404, 405 or 400 means this host has no JSON endpoint, so it falls
back to the XML flow and remembers which flavour worked for later reports.  The goal state
can be fetched ahead of time (`prefetch_goal_state`, a GET with no side effects) while
user-data is still being fetched, which takes one round trip off the XML path.

Pure parse/build functions come first; `WireserverClient` is the thin I/O around them.
`requests` is imported lazily (see transport.py); this module only needs its types.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from guest_agent import __version__
from guest_agent.errors import AgentError, FabricError
from guest_agent.transport import (
    Backoff,
    Deadline,
    Retry,
    http_retry_reason,
    parse_retry_after,
    retry_until,
    timeout_for,
)

if TYPE_CHECKING:
    import xml.etree.ElementTree as ET

    import requests

log = logging.getLogger("guest_agent.wireserver")

# "used in all regions and all national clouds ... will not change" (what-is-ip-address-168-63-129-16.md).
DEFAULT_WIRESERVER = "168.63.129.16"
# Every anchor and the MS "no agent" doc send 2012-11-30; version negotiation (?comp=versions) is skipped.
MS_VERSION = "2012-11-30"
DEFAULT_AGENT_NAME = f"guest-agent/{__version__}"

JSON_HEALTH_PATH = "/provisioning/health"
GOAL_STATE_PATH = "/machine/?comp=goalstate"  # WALinuxAgent's spelling; /machine?comp=... works too
XML_HEALTH_PATH = "/machine?comp=health"

READY = "Ready"
NOT_READY = "NotReady"
PROVISIONING_FAILED = "ProvisioningFailed"

FLAVOUR_JSON = "json"
FLAVOUR_XML = "xml"

OK_STATUS = frozenset({200, 201, 202})  # WALinuxAgent OK_CODES; the JSON endpoint answers 201
THROTTLE_STATUS = frozenset({403, 429, 503})  # WALinuxAgent THROTTLE_CODES; JSON 503 = "GoalState is not ready yet"
JSON_ABSENT_STATUS = frozenset({400, 404, 405})  # no JSON endpoint on this host: use the XML flow
GONE_STATUS = 410  # stale goal state / container (WALinuxAgent ResourceGoneError): refetch and repost

# cloud-init's HEALTH_REPORT_DESCRIPTION_TRIM_LEN; WALinuxAgent allows 3686, the host ~4096 bytes.
DESCRIPTION_MAX_CHARS = 512
# "In some environments a few goal state requests return a missing RoleInstance" (WALinuxAgent
# _GET_GOAL_STATE_MAX_ATTEMPTS = 6, 0.5 s apart; PR #2030).
ROLE_INSTANCE_READS = 6
ROLE_INSTANCE_RETRY_S = 0.5
MAX_BODY_BYTES = 1024 * 1024  # a goal state is ~2 KiB; never buffer an unbounded answer from the host

# Fast first retries (every request is on the critical path of pod start), capped at 2 s.
DEFAULT_BACKOFF = Backoff(initial_s=0.25, max_s=2.0, retry_after_max_s=30.0)

# Characters XML 1.0 cannot carry at all, even escaped.
_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


# --------------------------------------------------------------------------- pure parse/build


@dataclass(frozen=True)
class GoalState:
    incarnation: str
    container_id: str
    role_instance_id: str


class _PrefetchCancelled(Exception):
    """A report took over the goal-state read: the prefetch stops retrying."""


class GoalStateIncomplete(FabricError):
    """The goal state has no RoleInstance yet: the client reads it again (WALinuxAgent does too)."""


def escape(text: str) -> str:
    """XML character data escaping (what xml.sax.saxutils.escape does, without importing
    xml.sax, whose urllib.request import is ~50 ms under TCG on the JSON flow that needs no XML)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _text(el: ET.Element, path: str) -> str | None:
    found = el.find(path)
    if found is None or found.text is None or not found.text.strip():
        return None
    return found.text.strip()


def parse_goal_state(xml: bytes) -> GoalState:
    """The three values a health report echoes, by path; namespaces and unknown elements ignored.

    Raises `GoalStateIncomplete` when RoleInstance is missing, `FabricError` otherwise.
    """
    try:
        text = xml.decode("utf-8-sig")  # WALinuxAgent strips a BOM from wireserver bodies (textutil.remove_bom)
    except UnicodeDecodeError as exc:
        raise FabricError("the wireserver goal state is not UTF-8", error=str(exc)) from None
    # A goal state never has a DTD; refusing one rules out entity tricks from an untrusted host.
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise FabricError("the wireserver goal state carries a DTD, which it never should")
    import xml.etree.ElementTree as ET  # only the goal-state (XML) flow parses XML

    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise FabricError("the wireserver goal state is not well-formed XML", error=str(exc)) from None
    for el in root.iter():
        if isinstance(el.tag, str):
            el.tag = _local(el.tag)
    if root.tag != "GoalState":
        raise FabricError("the wireserver answer is not a GoalState document", root=root.tag[:40])
    incarnation = _text(root, "Incarnation")
    container_id = _text(root, "Container/ContainerId")
    if incarnation is None or container_id is None:
        missing = "Incarnation" if incarnation is None else "Container/ContainerId"
        raise FabricError("the wireserver goal state lacks a required element", element=missing)
    role = root.find("Container/RoleInstanceList/RoleInstance")  # the first one, as afterburn does
    if role is None:
        raise GoalStateIncomplete("the wireserver goal state has no RoleInstance yet")
    instance_id = _text(role, "InstanceId")
    if instance_id is None:
        raise FabricError("the wireserver goal state lacks a required element", element="RoleInstance/InstanceId")
    return GoalState(incarnation=incarnation, container_id=container_id, role_instance_id=instance_id)


def clean_description(text: str) -> str:
    """Drop what XML cannot carry, then trim to 512 characters (before any escaping)."""
    return _XML_INVALID.sub(" ", text)[:DESCRIPTION_MAX_CHARS]


def _check_state(state: str, substatus: str | None, description: str | None) -> None:
    if state not in (READY, NOT_READY):
        raise ValueError(f"health state must be Ready or NotReady, not {state!r}")
    if state == READY and (substatus is not None or description is not None):
        raise ValueError("a Ready report carries no details")


def build_health_xml(gs: GoalState, state: str, substatus: str | None = None, description: str | None = None) -> bytes:
    """The Health document for POST /machine?comp=health (azure.md §1.5); ids and text escaped."""
    _check_state(state, substatus, description)
    details = ""
    if substatus is not None:
        desc = escape(clean_description(description or ""))
        details = f"<Details><SubStatus>{escape(substatus)}</SubStatus><Description>{desc}</Description></Details>"
    doc = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<Health xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:xsd="http://www.w3.org/2001/XMLSchema">'
        f"<GoalStateIncarnation>{escape(gs.incarnation)}</GoalStateIncarnation>"
        f"<Container><ContainerId>{escape(gs.container_id)}</ContainerId>"
        f"<RoleInstanceList><Role><InstanceId>{escape(gs.role_instance_id)}</InstanceId>"
        f"<Health><State>{state}</State>{details}</Health>"
        "</Role></RoleInstanceList></Container></Health>\n"
    )
    return doc.encode("utf-8")


def build_health_json(state: str, substatus: str | None = None, description: str | None = None) -> bytes:
    """The body for POST /provisioning/health (azure.md §1.6)."""
    _check_state(state, substatus, description)
    doc: dict[str, object] = {"state": state}
    if substatus is not None:
        doc["details"] = {"subStatus": substatus, "description": clean_description(description or "")}
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def parse_option_245(value: str) -> str | None:
    """DHCP option 245 as systemd-networkd (``A83F8110``) or NetworkManager (``a8:3f:81:10``) store it.

    Big-endian u32 (afterburn src/util/dhcp.rs); a 1-digit pair is zero-padded like cloud-init's
    `get_ip_from_lease_value` does.  Returns None when the value is not an address.
    """
    v = value.strip()
    if ":" in v:
        parts = v.split(":")
        if len(parts) != 4 or not all(1 <= len(p) <= 2 for p in parts):
            return None
        v = "".join(p.zfill(2) for p in parts)
    if len(v) != 8:
        return None
    try:
        n = int(v, 16)
    except ValueError:
        return None
    if n in (0, 0xFFFFFFFF):
        return None
    return str(ipaddress.IPv4Address(n))


def wireserver_address(lease_dir: str, default: str = DEFAULT_WIRESERVER) -> str:
    """OPTION_245 from systemd-networkd's lease files ``<lease_dir>/<ifindex>``, else `default`.

    Reads what is there right now and never waits: the constant is correct on every Azure
    region (azure.md §1.1), the lease only matters for unusual fabrics.
    """
    try:
        names = [e.name for e in os.scandir(lease_dir) if e.name.isdigit() and e.is_file()]
    except OSError:
        return default
    for name in sorted(names, key=int):
        try:
            with open(os.path.join(lease_dir, name), encoding="utf-8", errors="replace") as f:
                text = f.read(64 * 1024)
        except OSError:
            continue
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "OPTION_245":
                addr = parse_option_245(value)
                if addr is not None:
                    return addr
    return default


# --------------------------------------------------------------------------- I/O


@dataclass(frozen=True)
class ReportResult:
    state: str  # Ready | NotReady
    flavour: str  # json | xml: the endpoint that acknowledged
    status: int  # its HTTP status
    round_trips: int  # HTTP requests this report made (a prefetched goal state is not counted)
    prefetched_goal_state: bool  # the XML flow used a goal state fetched ahead of time
    elapsed_s: float


@dataclass(frozen=True)
class _Response:
    status: int
    body: bytes
    retry_after_s: float | None


class _Count:
    def __init__(self) -> None:
        self.n = 0


class _RoleRetries:
    def __init__(self) -> None:
        self.n = 0


def _exc_reason(exc: BaseException) -> str:
    import requests

    if isinstance(exc, requests.ConnectTimeout):
        return "connect timeout"
    if isinstance(exc, requests.Timeout):
        return "read timeout"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return f"transport error ({type(exc).__name__})"


class WireserverClient:
    """Reports health to one wireserver; safe to share between the prefetch thread and the caller."""

    def __init__(
        self,
        base_url: str,
        *,
        session: requests.Session,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        backoff: Backoff = DEFAULT_BACKOFF,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 10.0,
        agent_name: str = DEFAULT_AGENT_NAME,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = session
        self.clock = clock
        self.sleep = sleep
        self.backoff = backoff
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.agent_name = agent_name
        self.wall_clock = wall_clock
        self.flavour: str | None = None  # learnt on the first acknowledged report
        self._lock = threading.Lock()
        self._goal_state: GoalState | None = None
        self._goal_state_prefetched = False
        # The prefetch keeps the raw body and parses nothing: XML (and its ~10 ms ElementTree
        # import) is needed only if the JSON endpoint turns out to be absent.
        self._prefetched_raw: bytes | None = None
        self._prefetch_running = False
        self._prefetch_cancel = threading.Event()
        self._prefetch_done = threading.Event()
        self.prefetch_round_trips = 0

    # -- requests

    def _send(
        self,
        session: requests.Session,
        method: str,
        path: str,
        *,
        headers: dict[str, str],
        deadline: Deadline,
        count: _Count,
        body: bytes | None = None,
    ) -> _Response:
        import requests
        import urllib3

        count.n += 1
        headers = {"User-Agent": self.agent_name, **headers}
        try:
            r = session.request(
                method,
                self.base_url + path,
                headers=headers,
                data=body,
                timeout=timeout_for(deadline, self.connect_timeout_s, self.read_timeout_s),
                allow_redirects=False,
                stream=True,
            )
            try:
                data = r.raw.read(MAX_BODY_BYTES, decode_content=True) or b""
            finally:
                r.close()
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise Retry(f"{method} {path.split('?')[0]}: {_exc_reason(exc)}") from None
        return _Response(r.status_code, data, parse_retry_after(r.headers.get("Retry-After"), self.wall_clock))

    def _raise_for(self, resp: _Response, what: str) -> None:
        """Map a non-success answer: throttles and 5xx are retried, any other 4xx is final."""
        if resp.status in THROTTLE_STATUS:
            raise Retry(f"{what}: HTTP {resp.status} (throttled)", retry_after_s=resp.retry_after_s)
        if resp.status >= 500 or resp.status == GONE_STATUS:
            raise Retry(f"{what}: {http_retry_reason(resp.status, b'')}", retry_after_s=resp.retry_after_s)
        raise FabricError(
            f"the wireserver rejected {what}",
            status=resp.status,
            body=resp.body[:200].decode("utf-8", "replace").strip(),
            endpoint=self.base_url,
        )

    # -- goal state

    def _get_goal_state_body(self, session: requests.Session, deadline: Deadline, count: _Count) -> bytes:
        resp = self._send(
            session,
            "GET",
            GOAL_STATE_PATH,
            headers={"x-ms-version": MS_VERSION, "x-ms-agent-name": self.agent_name},
            deadline=deadline,
            count=count,
        )
        if resp.status != 200:
            self._raise_for(resp, "the goal-state request")
        return resp.body

    def _parse_counting(self, body: bytes, roles: _RoleRetries) -> GoalState:
        try:
            return parse_goal_state(body)
        except GoalStateIncomplete as exc:
            roles.n += 1
            if roles.n >= ROLE_INSTANCE_READS:
                raise FabricError(exc.reason, reads=roles.n, endpoint=self.base_url) from None
            raise Retry(exc.reason, retry_after_s=ROLE_INSTANCE_RETRY_S) from None

    def _read_goal_state_once(
        self, session: requests.Session, deadline: Deadline, count: _Count, roles: _RoleRetries
    ) -> GoalState:
        return self._parse_counting(self._get_goal_state_body(session, deadline, count), roles)

    def _store_goal_state(self, gs: GoalState | None, *, prefetched: bool) -> None:
        with self._lock:
            self._goal_state = gs
            self._goal_state_prefetched = prefetched
            self._prefetched_raw = None

    def fetch_goal_state(self, deadline: Deadline) -> GoalState:
        """Read the goal state, retrying until `deadline`; it is kept for the next XML report."""
        count, roles = _Count(), _RoleRetries()
        gs = retry_until(
            lambda: self._read_goal_state_once(self.session, deadline, count, roles),
            what="reading the wireserver goal state",
            deadline=deadline,
            backoff=self.backoff,
            sleep=self.sleep,
            on_deadline=lambda last: FabricError(
                "the wireserver gave no goal state before the deadline",
                last_error=last,
                endpoint=self.base_url,
                deadline_s=deadline.seconds,
            ),
        )
        self._store_goal_state(gs, prefetched=False)
        return gs

    def prefetch_goal_state(self, deadline: Deadline, *, session: requests.Session | None = None) -> bytes | None:
        """Fetch the goal state ahead of a report, for a background thread.  Never raises.

        A GET has no side effects, so this may start before provisioning is known to succeed.
        It keeps retrying (the network may not be up yet) until it succeeds, the deadline
        passes, or a report needs the goal state itself (`_prefetch_cancel`).
        """
        s = session if session is not None else self.session
        with self._lock:
            if self._prefetch_running:
                return None
            self._prefetch_running = True
            self._prefetch_done.clear()
        count = _Count()

        def wait(delay_s: float) -> None:
            self._prefetch_cancel.wait(delay_s)  # returns early when a report cancels

        def attempt() -> bytes:
            if self._prefetch_cancel.is_set():
                raise _PrefetchCancelled
            return self._get_goal_state_body(s, deadline, count)

        try:
            # Backoff waits on the cancel event, not the injected sleep, so a report that
            # needs the goal state itself never waits out a prefetch's backoff.
            body = retry_until(
                attempt,
                what="prefetching the wireserver goal state",
                deadline=deadline,
                backoff=self.backoff,
                sleep=wait,
            )
            with self._lock:
                if self._goal_state is None:
                    self._prefetched_raw = body
            log.debug("goal state prefetched (%d bytes)", len(body))
            return body
        except _PrefetchCancelled:
            return None
        except AgentError as exc:
            log.info("goal-state prefetch gave up (the report will fetch it): %s", exc.describe())
            return None
        except Exception as exc:  # a background helper must never take the agent down
            log.warning("goal-state prefetch failed unexpectedly: %r", exc)
            return None
        finally:
            with self._lock:
                self._prefetch_running = False
                self.prefetch_round_trips += count.n
            self._prefetch_done.set()

    def cancel_prefetch(self) -> None:
        self._prefetch_cancel.set()

    def _goal_state_for_report(self, deadline: Deadline, count: _Count, roles: _RoleRetries) -> tuple[GoalState, bool]:
        with self._lock:
            gs, prefetched, running = self._goal_state, self._goal_state_prefetched, self._prefetch_running
        if gs is None and running:
            # A prefetch is under way: stop its retries and let an in-flight GET land rather than send a second one.
            self._prefetch_cancel.set()
            self._prefetch_done.wait(min(deadline.remaining(), self.connect_timeout_s + self.read_timeout_s))
            with self._lock:
                gs, prefetched = self._goal_state, self._goal_state_prefetched
        if gs is not None:
            return gs, prefetched
        with self._lock:
            raw, self._prefetched_raw = self._prefetched_raw, None
        if raw is not None:
            try:
                gs = self._parse_counting(raw, roles)
            except (Retry, FabricError) as exc:  # e.g. no RoleInstance yet: read it again below
                log.info("prefetched goal state not usable: %s", getattr(exc, "reason", exc))
            else:
                self._store_goal_state(gs, prefetched=True)
                return gs, True
        gs = self._read_goal_state_once(self.session, deadline, count, roles)
        self._store_goal_state(gs, prefetched=False)
        return gs, False

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
        count, roles = _Count(), _RoleRetries()
        gone = [0]

        def done(flavour: str, status: int, prefetched: bool) -> ReportResult:
            self.flavour = flavour
            return ReportResult(state, flavour, status, count.n, prefetched, self.clock() - start)

        def attempt() -> ReportResult:
            if self.flavour != FLAVOUR_XML:
                resp = self._send(
                    self.session,
                    "POST",
                    JSON_HEALTH_PATH,
                    headers={"Content-Type": "application/json", "x-ms-guest-agent-name": self.agent_name},
                    body=json_body,
                    deadline=deadline,
                    count=count,
                )
                if resp.status in OK_STATUS:
                    return done(FLAVOUR_JSON, resp.status, False)
                if resp.status in JSON_ABSENT_STATUS and self.flavour is None:
                    log.info("wireserver has no JSON health endpoint (HTTP %d): using goal state + XML", resp.status)
                    self.flavour = FLAVOUR_XML
                else:
                    self._raise_for(resp, "the JSON health report")
            gs, prefetched = self._goal_state_for_report(deadline, count, roles)
            resp = self._send(
                self.session,
                "POST",
                XML_HEALTH_PATH,
                headers={
                    "Content-Type": "text/xml; charset=utf-8",
                    "x-ms-version": MS_VERSION,
                    "x-ms-agent-name": self.agent_name,
                },
                body=build_health_xml(gs, state, substatus, description),
                deadline=deadline,
                count=count,
            )
            if resp.status in OK_STATUS:
                return done(FLAVOUR_XML, resp.status, prefetched)
            if resp.status == GONE_STATUS or (resp.status == 400 and b"InvalidContainerConfiguration" in resp.body):
                # Stale incarnation or container (live migration, WALinuxAgent PR #1299): read it again.
                # The first refetch is immediate; if the host keeps saying so, back off like any retry.
                self._store_goal_state(None, prefetched=False)
                gone[0] += 1
                raise Retry(
                    f"the XML health report: HTTP {resp.status} (stale goal state)",
                    immediate=gone[0] == 1,
                )
            self._raise_for(resp, "the XML health report")
            raise AssertionError("unreachable")

        try:
            result = retry_until(
                attempt,
                what=f"reporting {state} to the wireserver",
                deadline=deadline,
                backoff=self.backoff,
                sleep=self.sleep,
                on_deadline=lambda last: FabricError(
                    f"the wireserver did not acknowledge the {state} report before the deadline",
                    last_error=last,
                    endpoint=self.base_url,
                    round_trips=count.n,
                    deadline_s=deadline.seconds,
                ),
            )
        finally:
            self._prefetch_cancel.set()
        log.info(
            "reported %s to the wireserver (%s endpoint, HTTP %d, %d round trips, %.0f ms)",
            state,
            result.flavour,
            result.status,
            result.round_trips,
            result.elapsed_s * 1000,
        )
        return result
