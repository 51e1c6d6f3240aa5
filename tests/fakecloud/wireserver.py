"""A fake Azure WireServer: goal state, the XML health endpoint and the JSON one.

It checks requests the way the real one is known to (WALinuxAgent, cloud-init): goal state and XML health
need ``x-ms-version: 2012-11-30``; health bodies must come with their content type and parse.
A health report whose incarnation or container id is not the current goal state's answers
410 (a stale goal state).  Script routes (consumed before the normal behaviour, after the
header checks): ``json-health``, ``goalstate``, ``xml-health``.
"""

from __future__ import annotations

import json
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO
from xml.sax.saxutils import escape

from tests.fakecloud.server import FakeServer, Lifecycle, Reply, Request, Script

MS_VERSION = "2012-11-30"
CONTAINER_ID = "3d5a0b7e-91c4-4f0e-8e2b-6c1f0a9d7e42"
INSTANCE_ID = "8f2e61c04b9d4e7fa1c3d5b7e9f02468.podvm-nginx-6b8f9"


def goal_state_xml(
    incarnation: str = "1",
    container_id: str = CONTAINER_ID,
    instance_id: str = INSTANCE_ID,
    *,
    role_instance: bool = True,
    bom: bool = False,
    namespace: str | None = None,
) -> bytes:
    """A goal state shaped like the real one (Machine, config URLs, xsi attributes...)."""
    ns = f' xmlns="{namespace}"' if namespace else ""
    base = f"http://168.63.129.16:80/machine/{container_id}/{instance_id}"
    role = (
        "<RoleInstanceList><RoleInstance>"
        f"<InstanceId>{escape(instance_id)}</InstanceId><State>Started</State>"
        "<Configuration>"
        f"<HostingEnvironmentConfig>{base}?comp=config&amp;type=hostingEnvironmentConfig&amp;incarnation="
        f"{incarnation}</HostingEnvironmentConfig>"
        f"<SharedConfig>{base}?comp=config&amp;type=sharedConfig&amp;incarnation={incarnation}</SharedConfig>"
        f"<ExtensionsConfig>{base}?comp=config&amp;type=extensionsConfig&amp;incarnation="
        f"{incarnation}</ExtensionsConfig>"
        f"<FullConfig>{base}?comp=config&amp;type=fullConfig&amp;incarnation={incarnation}</FullConfig>"
        f"<ConfigName>{escape(instance_id)}.{incarnation}.xml</ConfigName>"
        "</Configuration></RoleInstance></RoleInstanceList>"
        if role_instance
        else "<RoleInstanceList />"
    )
    doc = (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<GoalState xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"{ns}'
        ' xsi:noNamespaceSchemaLocation="goalstate10.xsd">\n'
        f"  <Version>{MS_VERSION}</Version>\n  <Incarnation>{incarnation}</Incarnation>\n"
        "  <Machine><ExpectedState>Started</ExpectedState><StopRolesDeadlineHint>300000</StopRolesDeadlineHint>"
        "<LBProbePorts><Port>16001</Port></LBProbePorts><ExpectHealthReport>FALSE</ExpectHealthReport></Machine>\n"
        f"  <Container>\n    <ContainerId>{container_id}</ContainerId>\n    {role}\n  </Container>\n"
        "</GoalState>\n"
    )
    return (b"\xef\xbb\xbf" if bom else b"") + doc.encode("utf-8")


_default_render = goal_state_xml


@dataclass
class HealthReport:
    flavour: str  # json | xml
    state: str | None
    substatus: str | None
    description: str | None
    incarnation: str | None  # xml only
    container_id: str | None
    instance_id: str | None
    status: int  # what the fake answered
    request: Request


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def parse_health_xml(body: bytes) -> dict[str, str | None]:
    root = ET.fromstring(body)
    for el in root.iter():
        el.tag = _local(el.tag)
    if root.tag != "Health":
        raise ValueError("root is not Health")

    def t(path: str) -> str | None:
        el = root.find(path)
        return None if el is None else (el.text or "")

    role = "Container/RoleInstanceList/Role/"
    return {
        "incarnation": t("GoalStateIncarnation"),
        "container_id": t("Container/ContainerId"),
        "instance_id": t(role + "InstanceId"),
        "state": t(role + "Health/State"),
        "substatus": t(role + "Health/Details/SubStatus"),
        "description": t(role + "Health/Details/Description"),
    }


class FakeWireserver(Lifecycle):
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        log: IO[str] | None = None,
        *,
        json_endpoint: bool = True,
        script: Script | None = None,
        goal_state_xml: Callable[[str, str, str], bytes] | None = None,
        blackhole: bool = False,
        on_health: Callable[[Request], None] | None = None,
        latency_s: float = 0.0,
        versions: tuple[str, ...] = (MS_VERSION,),
    ) -> None:
        """`goal_state_xml(incarnation, container_id, instance_id)` renders the goal state;
        `blackhole` accepts every request and never answers; `on_health` runs inside the
        handler when a health POST arrives, before it is answered; `versions`: the x-ms-version
        values goal state and XML health accept (others get 400)."""
        self.versions = versions
        self.json_endpoint = json_endpoint
        self.script = script or Script()
        self.render = goal_state_xml or _default_render
        self.blackhole = blackhole
        self.on_health = on_health
        self.latency_s = latency_s
        self.incarnation = 1
        self.container_id = CONTAINER_ID
        self.instance_id = INSTANCE_ID
        self.reports: list[HealthReport] = []
        self._stale_after_reads = 0
        self._lock = threading.Lock()
        self._release = threading.Event()
        self.server = FakeServer("wireserver", self._handle, host=host, port=port, log=log)  # Nagle off there

    # -- test helpers

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> FakeWireserver:
        self.server.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.stop()

    def new_incarnation_after_next_read(self) -> None:
        """The next goal-state reader gets a copy that goes stale right after (live migration)."""
        with self._lock:
            self._stale_after_reads += 1

    def accepted(self) -> list[HealthReport]:
        with self._lock:
            return [r for r in self.reports if r.status in (200, 201, 202)]

    def wait_for_report(self, timeout_s: float = 10.0) -> bool:
        return self.server.wait_for(lambda reqs: bool(self.accepted()), timeout_s)

    def requests_to(self, route: str) -> list[Request]:
        return [r for r in self.server.requests if self._route(r) == route]

    # -- protocol

    @staticmethod
    def _route(req: Request) -> str | None:
        comp = (req.query.get("comp") or [""])[0]
        if req.path in ("/machine", "/machine/"):
            if req.method == "GET" and comp == "goalstate":
                return "goalstate"
            if req.method == "POST" and comp == "health":
                return "xml-health"
        if req.path == "/provisioning/health" and req.method == "POST":
            return "json-health"
        return None

    def _handle(self, req: Request) -> Reply:
        if self.blackhole:
            self._release.wait(60)
            return Reply(drop=True)
        reply = self._answer(req)
        if self.latency_s and not reply.delay_s:
            reply = Reply(reply.status, reply.body, reply.headers, self.latency_s, reply.drop)
        return reply

    def _answer(self, req: Request) -> Reply:
        route = self._route(req)
        if route == "json-health":
            if not self.json_endpoint:
                return Reply(404, "Not Found")
            return self._json_health(req)
        if route in ("goalstate", "xml-health") and req.header("x-ms-version") not in self.versions:
            return Reply(400, "<Error><Code>MissingOrInvalidVersionHeader</Code></Error>")
        if route == "goalstate":
            scripted = self.script.take("goalstate")
            if scripted:
                return scripted
            with self._lock:
                body = self.render(str(self.incarnation), self.container_id, self.instance_id)
                if self._stale_after_reads:
                    self._stale_after_reads -= 1
                    self.incarnation += 1
            return Reply(200, body, {"Content-Type": "text/xml; charset=utf-8"})
        if route == "xml-health":
            return self._xml_health(req)
        return Reply(404, "Not Found")

    def _record(self, rep: HealthReport) -> None:
        with self._lock:
            self.reports.append(rep)

    def _json_health(self, req: Request) -> Reply:
        if (req.header("content-type") or "").split(";")[0].strip().lower() != "application/json":
            return Reply(400, '{"error":"unsupported content type"}')
        try:
            doc = json.loads(req.body)
            state = doc["state"]
            details = doc.get("details") or {}
        except (ValueError, KeyError, TypeError, AttributeError):
            return Reply(400, '{"error":"malformed health report"}')
        if self.on_health is not None:
            self.on_health(req)
        scripted = self.script.take("json-health")
        status = scripted.status if scripted else 201
        self._record(
            HealthReport(
                "json", state, details.get("subStatus"), details.get("description"), None, None, None, status, req
            )
        )
        return scripted or Reply(201, "")

    def _xml_health(self, req: Request) -> Reply:
        if not (req.header("content-type") or "").lower().startswith("text/xml"):
            return Reply(400, "<Error><Code>UnsupportedMediaType</Code></Error>")
        try:
            h = parse_health_xml(req.body)
        except (ET.ParseError, ValueError):
            return Reply(400, "<Error><Code>InvalidXmlRequest</Code></Error>")
        if self.on_health is not None:
            self.on_health(req)
        scripted = self.script.take("xml-health")
        with self._lock:
            current = (str(self.incarnation), self.container_id, self.instance_id)
        if scripted:
            reply = scripted
        elif (h["incarnation"], h["container_id"], h["instance_id"]) != current:
            reply = Reply(410, "<Error><Code>ResourceGone</Code></Error>")
        else:
            reply = Reply(200, "")
        self._record(
            HealthReport(
                "xml",
                h["state"],
                h["substatus"],
                h["description"],
                h["incarnation"],
                h["container_id"],
                h["instance_id"],
                reply.status,
                req,
            )
        )
        return reply
