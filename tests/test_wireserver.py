"""WireServer parse/build functions and the client against a real fake wireserver on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest_agent import httpio
from guest_agent.azure.health import WireserverClient
from guest_agent.azure.wire import (
    DESCRIPTION_MAX_CHARS,
    NOT_READY,
    PROVISIONING_FAILED,
    READY,
    GoalState,
    GoalStateIncomplete,
    build_health_json,
    build_health_xml,
    clean_description,
    parse_goal_state,
    parse_option_245,
    wireserver_address,
)
from guest_agent.errors import FabricError
from guest_agent.transport import Backoff, Deadline
from tests.fakecloud.server import Reply, Script
from tests.fakecloud.wireserver import CONTAINER_ID, INSTANCE_ID, FakeWireserver, goal_state_xml, parse_health_xml
from tests.fuzzing import FUZZ

FIXTURES = Path(__file__).parent / "fixtures" / "azure"
AGENT = "guest-agent/9.9.9-test"
GS = GoalState("5", "c0ffee00-1234-4abc-9def-0123456789ab", "abc.vm-1")


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


# --------------------------------------------------------------------------- goal state


def test_parse_goal_state_plain() -> None:
    gs = parse_goal_state(fixture("goal_state.xml"))
    assert gs == GoalState(
        "1", "c0ffee00-1234-4abc-9def-0123456789ab", "0f1e2d3c4b5a69788796a5b4c3d2e1f0.podvm-busybox-5d2c1"
    )


def test_parse_goal_state_bom_namespaces_extra_elements_whitespace() -> None:
    data = fixture("goal_state_bom_namespaced.xml")
    assert data.startswith(b"\xef\xbb\xbf")
    gs = parse_goal_state(data)
    assert gs.incarnation == "17"
    assert gs.container_id == "c0ffee00-1234-4abc-9def-0123456789ab"
    assert gs.role_instance_id == "0f1e2d3c4b5a69788796a5b4c3d2e1f0.podvm-redis-&-7a9b0"  # first role, unescaped


def test_parse_goal_state_without_role_instance_is_retryable() -> None:
    with pytest.raises(GoalStateIncomplete):
        parse_goal_state(fixture("goal_state_no_role_instance.xml"))


@pytest.mark.parametrize(
    "data",
    [
        fixture("goal_state_no_container_id.xml"),
        b"<GoalState><Incarnation>1</Incarnation>",  # truncated
        b"<Versions><Preferred/></Versions>",  # some other document
        b"\xff\xfe<\x00G\x00",  # not UTF-8
        b'<!DOCTYPE GoalState [<!ENTITY a "aaaa">]><GoalState><Incarnation>&a;</Incarnation></GoalState>',
        b"<GoalState><Incarnation> </Incarnation><Container><ContainerId>x</ContainerId></Container></GoalState>",
    ],
)
def test_parse_goal_state_broken_is_final(data: bytes) -> None:
    with pytest.raises(FabricError) as ei:
        parse_goal_state(data)
    assert not isinstance(ei.value, GoalStateIncomplete)


# --------------------------------------------------------------------------- health bodies


def test_health_xml_ready_round_trips() -> None:
    body = build_health_xml(GS, "Ready")
    h = parse_health_xml(body)
    assert h == {
        "incarnation": "5",
        "container_id": GS.container_id,
        "instance_id": "abc.vm-1",
        "state": "Ready",
        "substatus": None,
        "description": None,
    }
    assert body.startswith(b'<?xml version="1.0" encoding="utf-8"?>')


def test_health_xml_not_ready_escapes_and_trims_before_escaping() -> None:
    gs = GoalState("1", "c<&>", "i&d")
    desc = "&" * 600
    h = parse_health_xml(build_health_xml(gs, "NotReady", "ProvisioningFailed", desc))
    assert (h["container_id"], h["instance_id"]) == ("c<&>", "i&d")
    assert (h["state"], h["substatus"]) == ("NotReady", "ProvisioningFailed")
    assert h["description"] == "&" * DESCRIPTION_MAX_CHARS  # 512 characters, not 512 bytes of "&amp;"


def test_health_xml_drops_characters_xml_cannot_carry() -> None:
    h = parse_health_xml(build_health_xml(GS, "NotReady", "ProvisioningFailed", "a\x00b\x1bc<d>"))
    assert h["description"] == "a b c<d>"


def test_health_json_shapes() -> None:
    assert json.loads(build_health_json("Ready")) == {"state": "Ready"}
    doc = json.loads(build_health_json("NotReady", "ProvisioningFailed", "é|" * 400))
    assert doc == {"state": "NotReady", "details": {"subStatus": "ProvisioningFailed", "description": "é|" * 256}}
    with pytest.raises(ValueError):
        build_health_json("Ready", "ProvisioningFailed", "x")
    with pytest.raises(ValueError):
        build_health_json("Healthy")


# What XML 1.0 cannot carry (its Char production's complement), and the body the json module builds.
XML_INVALID = "[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]"
# Every character class the check branches on, and its neighbours.
EDGE_CHARS = "".join(map(chr, [*range(0x21), 0x7F, 0x85, 0xD7FF, 0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xE000, 0xFFFD]))
EDGE_CHARS += "\ufffe\uffff\U00010000\U0010ffff\"'|<&é"


def json_module_body(state: str, substatus: str | None = None, description: str | None = None) -> bytes:
    doc: dict[str, object] = {"state": state}
    if substatus is not None:
        desc = re.sub(XML_INVALID, " ", description or "")[:DESCRIPTION_MAX_CHARS]
        doc["details"] = {"subStatus": substatus, "description": desc}
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def test_health_json_bytes() -> None:
    assert build_health_json(READY) == b'{"state":"Ready"}'
    assert build_health_json(NOT_READY, PROVISIONING_FAILED, 'a"b\\c\n\x00\ud800é\U0001f600') == (
        b'{"state":"NotReady","details":{"subStatus":"ProvisioningFailed",'
        b'"description":"a\\"b\\\\c\\n  \\u00e9\\ud83d\\ude00"}}'
    )


@FUZZ
@given(st.one_of(st.text(max_size=600), st.text(st.sampled_from(EDGE_CHARS), max_size=600)))
def test_health_json_equals_the_json_module(description: str) -> None:
    assert clean_description(description) == re.sub(XML_INVALID, " ", description[:DESCRIPTION_MAX_CHARS])
    body = build_health_json(NOT_READY, PROVISIONING_FAILED, description)
    assert body == json_module_body(NOT_READY, PROVISIONING_FAILED, description)
    assert build_health_json(READY) == json_module_body(READY)


def test_every_code_point_cleaned_is_what_expat_reads_back() -> None:
    """expat is the oracle: every code point, cleaned into a Health document's description,
    parses, and comes back as itself or, when XML cannot carry it, as a space (a CR as a LF:
    XML's line-end normalisation)."""
    from xml.etree import ElementTree

    every = "".join(map(chr, range(0x110000)))
    for i in range(0, len(every), DESCRIPTION_MAX_CHARS):
        chunk = every[i : i + DESCRIPTION_MAX_CHARS]
        doc = ElementTree.fromstring(build_health_xml(GS, NOT_READY, PROVISIONING_FAILED, chunk))
        got = doc.findtext(".//Description")
        want = "".join(c if re.fullmatch(XML_INVALID, c) is None else " " for c in chunk).replace("\r", "\n")
        assert got == want, hex(i)


# --------------------------------------------------------------------------- OPTION_245


@pytest.mark.parametrize(
    ("value", "addr"),
    [
        ("A83F8110", "168.63.129.16"),
        ("a8:3f:81:10", "168.63.129.16"),
        ("a8:3f:81:1", "168.63.129.1"),
        ("7F000001", "127.0.0.1"),
        ("A83F81", None),
        ("zz3f8110", None),
        ("00000000", None),
        ("", None),
    ],
)
def test_parse_option_245(value: str, addr: str | None) -> None:
    assert parse_option_245(value) == addr


def test_wireserver_address_from_networkd_leases(tmp_path: Path) -> None:
    assert wireserver_address(str(tmp_path / "missing")) == "168.63.129.16"
    (tmp_path / "1").write_text("ADDRESS=127.0.0.1\n")  # loopback: no option 245
    (tmp_path / "10").write_text("OPTION_245=0A000002\n")
    assert wireserver_address(str(tmp_path)) == "10.0.0.2"
    (tmp_path / "2").write_bytes(fixture("networkd_lease"))  # lower ifindex wins
    assert wireserver_address(str(tmp_path)) == "168.63.129.16"
    (tmp_path / "2").write_text("OPTION_245=garbage\n")
    assert wireserver_address(str(tmp_path), default="192.0.2.1") == "10.0.0.2"


# --------------------------------------------------------------------------- client over HTTP


class Sleeps:
    """Injected sleep: records the delays and does not wait (the deadline still uses real time)."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, s: float) -> None:
        self.delays.append(s)


def client(url: str, sleep: Callable[[float], None] | None = None, **kw: Any) -> WireserverClient:
    kw.setdefault("connect_timeout_s", 1.0)
    kw.setdefault("read_timeout_s", 2.0)
    kw.setdefault("rand", lambda: 1.0)  # the full backoff cap: delays are asserted exactly
    return WireserverClient(url, sleep=sleep or Sleeps(), agent_name=AGENT, **kw)


def deadline(s: float = 30.0) -> Deadline:
    return Deadline(s)


def test_json_flow_headers_and_body(servers: Callable[..., FakeWireserver]) -> None:
    ws = servers()
    res = client(ws.url).report("Ready", deadline=deadline())
    assert (res.flavour, res.status, res.round_trips) == ("json", 201, 1)
    (req,) = ws.server.requests
    assert (req.method, req.raw_path) == ("POST", "/provisioning/health")
    assert req.header("content-type") == "application/json"
    assert req.header("x-ms-guest-agent-name") == AGENT
    assert req.header("user-agent") == AGENT
    assert json.loads(req.body) == {"state": "Ready"}
    assert [(r.flavour, r.state) for r in ws.accepted()] == [("json", "Ready")]


def test_json_absent_falls_back_to_goal_state_and_xml(servers: Callable[..., FakeWireserver]) -> None:
    ws = servers(json_endpoint=False)
    c = client(ws.url)
    res = c.report("Ready", deadline=deadline())
    assert (res.flavour, res.status, res.round_trips) == ("xml", 200, 3)
    json_req, gs_req, post = ws.server.requests
    assert json_req.raw_path == "/provisioning/health"
    assert (gs_req.method, gs_req.raw_path) == ("GET", "/machine/?comp=goalstate")
    assert gs_req.header("x-ms-version") == "2012-11-30"
    assert gs_req.header("x-ms-agent-name") == AGENT
    assert (post.method, post.raw_path) == ("POST", "/machine?comp=health")
    assert post.header("content-type") == "text/xml; charset=utf-8"
    assert post.header("x-ms-version") == "2012-11-30"
    assert post.header("x-ms-agent-name") == AGENT
    assert parse_health_xml(post.body) == {
        "incarnation": "1",
        "container_id": CONTAINER_ID,
        "instance_id": INSTANCE_ID,
        "state": "Ready",
        "substatus": None,
        "description": None,
    }
    # The flavour is remembered: a later report goes straight to XML, reusing the goal state.
    res2 = c.report("NotReady", description="second", deadline=deadline())
    assert (res2.flavour, res2.round_trips) == ("xml", 1)
    assert len(ws.requests_to("json-health")) == 1


@pytest.mark.parametrize("status", [400, 405])
def test_json_400_and_405_also_mean_absent(servers: Callable[..., FakeWireserver], status: int) -> None:
    ws = servers(script=Script({"json-health": [Reply(status)]}))
    res = client(ws.url).report("Ready", deadline=deadline())
    assert res.flavour == "xml"


def test_goal_state_with_bom_namespaces_and_extra_elements(servers: Callable[..., FakeWireserver]) -> None:
    def render(inc: str, cid: str, iid: str) -> bytes:
        return goal_state_xml(inc, cid, iid, bom=True, namespace="http://schemas.microsoft.com/windowsazure")

    ws = servers(json_endpoint=False, goal_state_xml=render)
    assert client(ws.url).report("Ready", deadline=deadline()).flavour == "xml"
    (rep,) = ws.accepted()
    assert (rep.incarnation, rep.container_id, rep.instance_id) == ("1", CONTAINER_ID, INSTANCE_ID)


def test_role_instance_missing_twice_then_present(servers: Callable[..., FakeWireserver]) -> None:
    empty = Reply(200, goal_state_xml(role_instance=False))
    ws = servers(json_endpoint=False, script=Script({"goalstate": [empty, empty]}))
    sleeps = Sleeps()
    res = client(ws.url, sleep=sleeps).report("Ready", deadline=deadline())
    assert res.round_trips == 1 + 3 + 1
    assert sleeps.delays == [0.5 + 0.5, 0.5 + 0.5]  # WALinuxAgent's 0.5 s between goal-state reads, plus jitter
    assert len(ws.accepted()) == 1


def test_role_instance_missing_six_times_fails(servers: Callable[..., FakeWireserver]) -> None:
    empty = Reply(200, goal_state_xml(role_instance=False))
    ws = servers(json_endpoint=False, script=Script({"goalstate": [empty] * 6}))
    with pytest.raises(FabricError, match="no RoleInstance"):
        client(ws.url).report("Ready", deadline=deadline())
    assert len(ws.requests_to("goalstate")) == 6


def test_gone_after_goal_state_read_refetches_and_reposts(servers: Callable[..., FakeWireserver]) -> None:
    ws = servers(json_endpoint=False)
    ws.new_incarnation_after_next_read()
    sleeps = Sleeps()
    res = client(ws.url, sleep=sleeps).report("Ready", deadline=deadline())
    assert res.round_trips == 5  # json 404, GET, POST 410, GET, POST 200
    assert sleeps.delays == [0.0]  # the first refetch is immediate
    assert [(r.status, r.incarnation) for r in ws.reports] == [(410, "1"), (200, "2")]


def test_invalid_container_configuration_refetches(servers: Callable[..., FakeWireserver]) -> None:
    bad = Reply(400, "<Error><Code>InvalidContainerConfiguration</Code></Error>")
    ws = servers(json_endpoint=False, script=Script({"xml-health": [bad]}))
    client(ws.url).report("Ready", deadline=deadline())
    assert len(ws.requests_to("goalstate")) == 2
    assert [r.status for r in ws.reports] == [400, 200]


def test_three_503_then_success(servers: Callable[..., FakeWireserver]) -> None:
    ws = servers(script=Script({"json-health": [Reply(503, "GoalState is not ready yet")] * 3}))
    sleeps = Sleeps()
    res = client(ws.url, sleep=sleeps, backoff=Backoff(0.25, 2.0, 30.0)).report("Ready", deadline=deadline())
    assert (res.flavour, res.round_trips) == ("json", 4)
    assert sleeps.delays == [0.25, 0.5, 1.0]
    assert [r.status for r in ws.reports] == [503, 503, 503, 201]


def test_retry_after_is_honoured(servers: Callable[..., FakeWireserver]) -> None:
    script = Script(
        {
            "json-health": [Reply(503, headers={"Retry-After": "7"}), Reply(429, headers={"Retry-After": "3"})],
        }
    )
    ws = servers(script=script)
    sleeps = Sleeps()
    res = client(ws.url, sleep=sleeps, rand=lambda: 0.5).report("Ready", deadline=deadline())
    assert res.round_trips == 3
    assert sleeps.delays == [7.0 + 1.0, 3.0 + 1.0]  # Retry-After, then jitter over min(Retry-After, 2 s)


def test_server_errors_on_goal_state_are_retried(servers: Callable[..., FakeWireserver]) -> None:
    ws = servers(json_endpoint=False, script=Script({"goalstate": [Reply(500), Reply(403)]}))
    res = client(ws.url).report("Ready", deadline=deadline())
    assert res.round_trips == 1 + 3 + 1


@pytest.mark.parametrize(("route", "status"), [("xml-health", 409), ("goalstate", 401)])
def test_other_client_errors_fail_with_a_reason(
    servers: Callable[..., FakeWireserver], route: str, status: int
) -> None:
    ws = servers(json_endpoint=False, script=Script({route: [Reply(status, "nope")]}))
    with pytest.raises(FabricError) as ei:
        client(ws.url).report("Ready", deadline=deadline())
    assert ei.value.supporting_data["status"] == status
    assert "rejected" in ei.value.reason


def test_json_client_error_after_json_worked_is_final(servers: Callable[..., FakeWireserver]) -> None:
    ws = servers()
    c = client(ws.url)
    c.report("Ready", deadline=deadline())
    ws.script.add("json-health", Reply(404))
    with pytest.raises(FabricError):
        c.report("NotReady", description="x", deadline=deadline())


def test_never_answering_wireserver_reaches_the_deadline(servers: Callable[..., FakeWireserver]) -> None:
    ws = servers(blackhole=True)
    c = client(ws.url, sleep=time.sleep, connect_timeout_s=0.1, read_timeout_s=0.1)
    with pytest.raises(FabricError) as ei:
        c.report("Ready", deadline=Deadline(0.6))
    assert "did not acknowledge the Ready report before the deadline" in ei.value.reason
    assert ei.value.supporting_data["last_error"].startswith("POST /provisioning/health: timed out")
    assert ei.value.supporting_data["round_trips"] >= 1


def test_refused_connections_reach_the_deadline() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    c = client(f"http://127.0.0.1:{port}", sleep=time.sleep, connect_timeout_s=0.1)
    with pytest.raises(FabricError) as ei:
        c.report("Ready", deadline=Deadline(0.5))
    assert ei.value.supporting_data["last_error"] == "POST /provisioning/health: connection failed (Connection refused)"


@pytest.mark.parametrize("json_endpoint", [True, False])
def test_not_ready_carries_the_reason_on_both_shapes(
    servers: Callable[..., FakeWireserver], json_endpoint: bool
) -> None:
    ws = servers(json_endpoint=json_endpoint)
    reason = "user-data is not valid YAML: <line 3> & 'col 5' | stage=fetch; " + "x" * 600
    res = client(ws.url).report("NotReady", description=reason, deadline=deadline())
    assert res.flavour == ("json" if json_endpoint else "xml")
    (rep,) = ws.accepted()
    assert (rep.state, rep.substatus) == ("NotReady", "ProvisioningFailed")
    assert rep.description == reason[:512]
    if not json_endpoint:
        assert b"&lt;line 3&gt; &amp; 'col 5'" in rep.request.body


def test_wrong_version_header_is_rejected_by_the_fake(servers: Callable[..., FakeWireserver]) -> None:
    """The fake enforces what the real server does, so the tests above mean something."""
    ws = servers()

    def send(method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> int:
        kw: Any = {"budget_s": 2.0, "connect_timeout_s": 1.0, "max_body": 65536}
        return httpio.exchange(method, ws.url + path, headers=headers, body=body, **kw).status

    assert send("GET", "/machine/?comp=goalstate", {"x-ms-version": "2015-04-05"}) == 400
    xml_headers = {"x-ms-version": "2012-11-30", "Content-Type": "application/xml"}
    assert send("POST", "/machine?comp=health", xml_headers, build_health_xml(GS, "Ready")) == 400
    assert send("POST", "/provisioning/health", {"Content-Type": "text/plain"}, b'{"state":"Ready"}') == 400


@pytest.mark.parametrize(
    "data",
    [
        b"<GoalState>" + b"<a>" * 100_000 + b"</a>" * 100_000 + b"</GoalState>",  # deep: no RecursionError
        b"<GoalState>" + b"<a/>" * 20_000 + b"</GoalState>",  # wide
        b"<GoalState><Incarnation>" + b"1" * 300_000 + b"</Incarnation></GoalState>",  # large
        b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;">]>'
        b"<GoalState><Incarnation>&b;</Incarnation></GoalState>",  # billion laughs
        b'<!DOCTYPE GoalState SYSTEM "file:///etc/passwd"><GoalState/>',  # external entity
        b"<GoalState><Incarnation>\x00</Incarnation></GoalState>",
        b"",
    ],
)
def test_hostile_goal_states_are_fabric_errors(data: bytes) -> None:
    with pytest.raises(FabricError):
        parse_goal_state(data)
