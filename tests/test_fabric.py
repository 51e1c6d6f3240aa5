"""AzureFabric end to end against the fake wireserver: KVP first, then the health report."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from guest_agent import __version__
from guest_agent.azure import kvp
from guest_agent.azure.fabric import AzureFabric, read_vm_id, wireserver_base_url
from guest_agent.config import AzureConfig
from guest_agent.errors import FabricError, UserDataInvalid
from tests.fakecloud.server import Request
from tests.fakecloud.wireserver import FakeWireserver

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
    err = UserDataInvalid("user-data is not valid YAML", line=3, problem="a|b")
    err.stage = "validate"
    res = fabric(ws.url, root).report_failure(err, {"fetch": 12.0})
    assert res is not None and (res.state, res.flavour) == ("NotReady", "xml")
    (before,) = at_post.seen
    value = before[0][1]
    report = kvp.parse_provisioning_report(value)
    assert (report["result"], report["reason"]) == ("error", "user-data is not valid YAML")
    assert (report["stage"], report["line"], report["problem"]) == ("validate", "3", "a|b")
    assert report["vm_id"] == "2b1a1d5e-4d3c-6f5e-7a8b-9c0d1e2f3a4b"  # Gen1: byte-swapped
    # the Description is the same encoded report (cloud-init, azure-init), quoted only where needed
    head = f"result=error|reason=user-data is not valid YAML|agent=guest-agent/{__version__}"
    assert value.startswith(head + "|stage=validate|line=3|'problem=a|b'|vm_id=")
    (rep,) = ws.accepted()
    assert (rep.state, rep.substatus, rep.description) == ("NotReady", "ProvisioningFailed", value)


def test_failure_on_the_json_shape(tmp_path: Path, servers: Callable[..., FakeWireserver]) -> None:
    root = make_root(tmp_path)
    ws = servers()
    reason = "no user-data & no config disk <after 180 s>"
    res = fabric(ws.url, root).report_failure(reason, {})
    assert res is not None and res.flavour == "json"
    (rep,) = ws.accepted()
    assert (rep.flavour, rep.state, rep.substatus) == ("json", "NotReady", "ProvisioningFailed")
    assert kvp.parse_provisioning_report(rep.description or "")["reason"] == reason
    assert rep.description == pool(root)[0][1]


def test_never_ready_after_a_failure(tmp_path: Path, servers: Callable[..., FakeWireserver]) -> None:
    root = make_root(tmp_path)
    ws = servers()
    f = fabric(ws.url, root)
    f.report_failure("boom", {})
    with pytest.raises(FabricError, match="never Ready after it"):
        f.report_ready({})
    # nor a later run in the same boot (a fresh fabric: the marker under /run/guest-agent)
    with pytest.raises(FabricError, match="never Ready after it"):
        fabric(ws.url, root).report_ready({})
    assert [r.state for r in ws.reports] == ["NotReady"]
    assert [kvp.parse_provisioning_report(v)["result"] for _, v in pool(root)] == ["error"]


def test_marker_is_written_before_the_not_ready_post(tmp_path: Path, servers: Callable[..., FakeWireserver]) -> None:
    root = make_root(tmp_path)
    seen: list[bool] = []
    ws = servers(on_health=lambda req: seen.append((root / "run/guest-agent/azure-not-ready").exists()))
    fabric(ws.url, root).report_failure("boom", {})
    assert seen == [True]


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
    assert f.report_ready({}) is None
    assert ws.server.requests == []
    assert len(pool(root)) == 1


def test_wireserver_url_from_the_lease_under_root(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    leases = root / "run/systemd/netif/leases"
    assert wireserver_base_url(AzureConfig(), str(root)) == "http://168.63.129.16"
    leases.mkdir(parents=True)
    (leases / "2").write_text("ADDRESS=10.1.0.4\nOPTION_245=0A010002\n")
    assert wireserver_base_url(AzureConfig(), str(root)) == "http://10.1.0.2"
    assert wireserver_base_url(AzureConfig(wireserver_url="http://127.0.0.1:9/"), str(root)) == "http://127.0.0.1:9"
