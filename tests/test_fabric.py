"""AzureFabric end to end against the fake wireserver: KVP first, then the health report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guest_agent import __version__, kvp
from guest_agent.config import AzureConfig
from guest_agent.errors import FabricError
from guest_agent.fabric import AzureFabric, read_vm_id, wireserver_base_url
from tests.fakecloud.server import Reply, Request, Script
from tests.fakecloud.wireserver import FakeWireserver, goal_state_xml

PRODUCT_UUID = "5E1D1A2B-3C4D-5E6F-7A8B-9C0D1E2F3A4B"
STAGES = {"detect": 2.2, "network": 410.0, "fetch": 35.7}


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, s: float) -> None:
        self.delays.append(s)


def make_root(tmp_path: Path, *, efi: bool = True, kvp_dir: bool = True, dmi: bool = True) -> Path:
    root = tmp_path / "root"
    if dmi:
        (root / "sys/class/dmi/id").mkdir(parents=True)
        (root / "sys/class/dmi/id/product_uuid").write_text(PRODUCT_UUID + "\n")
    if efi:
        (root / "sys/firmware/efi").mkdir(parents=True)
    if kvp_dir:
        (root / "var/lib/hyperv").mkdir(parents=True)
    root.mkdir(exist_ok=True)
    return root


def pool(root: Path) -> list[tuple[str, str]]:
    f = root / "var/lib/hyperv/.kvp_pool_1"
    return kvp.decode_records(f.read_bytes()) if f.exists() else []


class KvpAtPost:
    """on_health hook: what the pool file held when the wireserver received the POST."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: list[list[tuple[str, str]]] = []

    def __call__(self, req: Request) -> None:
        self.seen.append(pool(self.root))


def fabric(url: str, root: Path, sleep: Callable[[float], None] | None = None, **cfg: Any) -> AzureFabric:
    base: dict[str, Any] = {"ready_deadline_s": 30.0, "wireserver_connect_timeout_s": 1.0}
    c = dataclasses.replace(AzureConfig(wireserver_url=url), **{"wireserver_read_timeout_s": 2.0, **base, **cfg})
    return AzureFabric(c, root=str(root), sleep=sleep or Sleeps())


def test_ready_writes_kvp_before_posting(tmp_path: Path, servers: Callable[..., FakeWireserver]) -> None:
    root = make_root(tmp_path)
    at_post = KvpAtPost(root)
    ws = servers(on_health=at_post)
    res = fabric(ws.url, root).report_ready(STAGES)
    assert res is not None and (res.state, res.flavour) == ("Ready", "json")
    (before,) = at_post.seen
    ((key, value),) = before  # already on disk when the POST arrived
    assert key == "PROVISIONING_REPORT"
    report = kvp.parse_provisioning_report(value)
    assert report == {
        "result": "success",
        "agent": f"guest-agent/{__version__}",
        "vm_id": PRODUCT_UUID.lower(),  # Gen2 (EFI): as DMI says, lower-cased
        "timestamp": report["timestamp"],
        "detect_ms": "2",
        "network_ms": "410",
        "fetch_ms": "36",
    }
    assert report["timestamp"].endswith("Z")
    assert [(r.flavour, r.state) for r in ws.accepted()] == [("json", "Ready")]


def test_failure_writes_kvp_then_not_ready_on_the_xml_shape(
    tmp_path: Path, servers: Callable[..., FakeWireserver]
) -> None:
    root = make_root(tmp_path, efi=False)
    at_post = KvpAtPost(root)
    ws = servers(json_endpoint=False, on_health=at_post)
    reason = "user-data is not valid YAML; stage=validate; line=3"
    res = fabric(ws.url, root).report_failure(reason, {"fetch": 12.0})
    assert res is not None and (res.state, res.flavour) == ("NotReady", "xml")
    (before,) = at_post.seen
    report = kvp.parse_provisioning_report(before[0][1])
    assert (report["result"], report["reason"]) == ("error", reason)
    assert report["vm_id"] == "2b1a1d5e-4d3c-6f5e-7a8b-9c0d1e2f3a4b"  # Gen1: byte-swapped
    (rep,) = ws.accepted()
    assert (rep.state, rep.substatus, rep.description) == ("NotReady", "ProvisioningFailed", reason)


def test_failure_on_the_json_shape(tmp_path: Path, servers: Callable[..., FakeWireserver]) -> None:
    root = make_root(tmp_path)
    ws = servers()
    reason = "no user-data & no config disk <after 180 s>"
    res = fabric(ws.url, root).report_failure(reason, {})
    assert res is not None and res.flavour == "json"
    (rep,) = ws.accepted()
    assert (rep.flavour, rep.state, rep.substatus, rep.description) == (
        "json",
        "NotReady",
        "ProvisioningFailed",
        reason,
    )


def test_never_ready_after_a_failure(tmp_path: Path, servers: Callable[..., FakeWireserver]) -> None:
    root = make_root(tmp_path)
    ws = servers()
    f = fabric(ws.url, root)
    f.report_failure("boom", {})
    with pytest.raises(FabricError):
        f.report_ready({})
    assert [r.state for r in ws.reports] == ["NotReady"]


def silent_wireserver(root: Path, servers: Callable[..., FakeWireserver], **deadline_s: float) -> AzureFabric:
    """A fabric whose wireserver accepts connections and never answers, with short deadlines."""
    ws = servers(blackhole=True)
    return fabric(
        ws.url, root, sleep=time.sleep, wireserver_connect_timeout_s=0.1, wireserver_read_timeout_s=0.1, **deadline_s
    )


def test_failure_report_is_bounded_and_never_raises(tmp_path: Path, servers: Callable[..., FakeWireserver]) -> None:
    root = make_root(tmp_path)
    f = silent_wireserver(root, servers, failure_deadline_s=0.5)
    assert f.report_failure("fetch failed", {}) is None
    assert kvp.parse_provisioning_report(pool(root)[0][1])["result"] == "error"  # KVP still there for the host


def test_ready_deadline_raises_fabric_error(tmp_path: Path, servers: Callable[..., FakeWireserver]) -> None:
    root = make_root(tmp_path)
    f = silent_wireserver(root, servers, ready_deadline_s=0.5)
    with pytest.raises(FabricError, match="before the deadline"):
        f.report_ready({})


def test_no_kvp_dir_and_no_dmi_still_report(tmp_path: Path, servers: Callable[..., FakeWireserver]) -> None:
    root = make_root(tmp_path, kvp_dir=False, dmi=False)
    ws = servers()
    f = fabric(ws.url, root)
    assert f.report_ready({}) is not None
    assert f.kvp_written is False
    assert read_vm_id(str(root)) == kvp.ZERO_UUID
    assert len(ws.accepted()) == 1


def test_report_ready_off(tmp_path: Path, servers: Callable[..., FakeWireserver]) -> None:
    root = make_root(tmp_path)
    ws = servers()
    f = fabric(ws.url, root, report_ready=False)
    f.start_prefetch()
    assert f.report_ready({}) is None
    assert ws.server.requests == []
    assert len(pool(root)) == 1


def test_prefetched_goal_state_is_used(tmp_path: Path, servers: Callable[..., FakeWireserver]) -> None:
    root = make_root(tmp_path)
    ws = servers(json_endpoint=False)
    f = fabric(ws.url, root)
    f.start_prefetch()
    assert f.wait_prefetch(10)
    res = f.report_ready({})
    assert res is not None and (res.flavour, res.round_trips, res.prefetched_goal_state) == ("xml", 2, True)
    assert len(ws.requests_to("goalstate")) == 1


def test_prefetch_retries_until_the_goal_state_is_served(
    tmp_path: Path, servers: Callable[..., FakeWireserver]
) -> None:
    root = make_root(tmp_path)
    ws = servers(json_endpoint=False, script=Script({"goalstate": [Reply(503), Reply(500)]}))
    f = fabric(ws.url, root)
    f.start_prefetch()
    assert f.wait_prefetch(10)
    res = f.report_ready({})
    assert res is not None and res.prefetched_goal_state
    assert len(ws.requests_to("goalstate")) == 3


def test_report_waits_for_an_in_flight_prefetch(tmp_path: Path, servers: Callable[..., FakeWireserver]) -> None:
    root = make_root(tmp_path)
    slow = Reply(200, goal_state_xml(), delay_s=0.5)  # still in flight when the report starts
    ws = servers(json_endpoint=False, script=Script({"goalstate": [slow]}))
    f = fabric(ws.url, root)
    f.start_prefetch()
    assert ws.server.wait_for(lambda reqs: any(r.path.startswith("/machine") for r in reqs))
    res = f.report_ready({})
    assert res is not None and res.prefetched_goal_state
    assert len(ws.requests_to("goalstate")) == 1  # no second GET


def test_wireserver_url_from_the_lease_under_root(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    leases = root / "run/systemd/netif/leases"
    assert wireserver_base_url(AzureConfig(), str(root)) == "http://168.63.129.16"
    leases.mkdir(parents=True)
    (leases / "2").write_text("ADDRESS=10.1.0.4\nOPTION_245=0A010002\n")
    assert wireserver_base_url(AzureConfig(), str(root)) == "http://10.1.0.2"
    assert wireserver_base_url(AzureConfig(wireserver_url="http://127.0.0.1:9/"), str(root)) == "http://127.0.0.1:9"
