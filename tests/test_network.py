from __future__ import annotations

import errno
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent import network
from guest_agent.errors import NetworkUnavailable
from guest_agent.podnet.nsenter import run_in_netns
from tests.netutil import Namespaces, namespaces

IMDS = "169.254.169.254"


# ---------------------------------------------------------------------------------------------
# The wait loop with scripted lookups and wake-ups (no sockets)


def _route(prefsrc: str | None) -> network.RouteInfo:
    return network.RouteInfo(IMDS, 2, "10.0.0.1", prefsrc, 254, True)


class Script:
    """`look` answers from `routes` in turn (the last one repeats); `wait` answers from `wakes`
    (None: the timeout passed) and advances the clock by the timeout it was given when nothing came."""

    def __init__(self, routes: list[network.RouteInfo | None], wakes: list[int | None]) -> None:
        self.routes, self.wakes = routes, wakes
        self.now = 0.0
        self.looks = 0
        self.timeouts: list[float] = []

    def look(self, waited: bool, events: int) -> network.RouteInfo | None:
        self.looks += 1
        return self.routes[min(self.looks, len(self.routes)) - 1]

    def wait(self, timeout_s: float) -> int | None:
        self.timeouts.append(timeout_s)
        got = self.wakes.pop(0) if self.wakes else None
        if got is None:
            self.now += timeout_s
        return got

    def run(self, deadline: float = 120.0) -> network.RouteInfo | None:
        return network.await_route(
            self.look, self.wait, deadline=deadline, require_prefsrc=True, clock=lambda: self.now
        )


def test_a_source_address_that_comes_without_an_event_is_found_soon() -> None:
    # The address event woke us while source selection still said "none" (the kernel announces
    # the address first); no further event comes.  One look after SOURCE_RECHECK_S finds it.
    s = Script([None, _route(None), _route("10.0.0.5")], wakes=[3, None])
    info = s.run()
    assert info is not None and info.prefsrc == "10.0.0.5"
    assert s.timeouts == [120.0, network.SOURCE_RECHECK_S]
    assert s.now == pytest.approx(network.SOURCE_RECHECK_S)


def test_a_sourceless_route_costs_one_recheck_per_event_not_polling() -> None:
    # On-link routes before the lease: every event gets one recheck, then the loop waits for events only.
    s = Script([_route(None)], wakes=[None, 1, None])
    assert s.run(deadline=5.0) is None
    # first look sourceless -> recheck (no event) -> wait for events -> event -> recheck -> wait to the deadline
    r = network.SOURCE_RECHECK_S
    assert s.timeouts[:4] == [r, pytest.approx(5.0 - r), r, pytest.approx(5.0 - 2 * r)]
    assert s.looks == 5  # first, recheck, after the event, its recheck, the last look at the deadline


def test_no_route_waits_for_events_without_rechecks() -> None:
    s = Script([None, None, _route("10.0.0.5")], wakes=[1, 2])
    info = s.run()
    assert info is not None and info.prefsrc == "10.0.0.5"
    assert s.timeouts == [120.0, 120.0]


# ---------------------------------------------------------------------------------------------
# Pure build/parse (no privileges)


def test_build_route_get_layout() -> None:
    msg = network.build_route_get(IMDS, seq=7)
    length, msg_type, flags, seq, pid = network.NLMSG_HDR.unpack_from(msg)
    assert (length, msg_type, flags, seq, pid) == (len(msg), network.RTM_GETROUTE, network.NLM_F_REQUEST, 7, 0)
    family, dst_len, *_ = network.RTMSG.unpack_from(msg, 16)
    assert (family, dst_len) == (socket.AF_INET, 32)
    attrs = list(network.iter_rtattrs(msg, 16 + network.RTMSG.size))
    assert attrs == [(network.RTA_DST, socket.inet_aton(IMDS))]


def test_build_route_get_ipv6() -> None:
    msg = network.build_route_get("fd00:ec2::254", seq=1)
    family, dst_len, *_ = network.RTMSG.unpack_from(msg, 16)
    assert (family, dst_len) == (socket.AF_INET6, 128)


def test_family_of_rejects_names() -> None:
    with pytest.raises(ValueError):
        network.family_of("metadata.google.internal")


def test_parse_route_reply() -> None:
    body = network.RTMSG.pack(socket.AF_INET, 32, 0, 0, 254, 0, 0, 1, 0)
    body += network.rtattr(network.RTA_TABLE, struct.pack("=I", 254))
    body += network.rtattr(network.RTA_DST, socket.inet_aton(IMDS))
    body += network.rtattr(network.RTA_OIF, struct.pack("=I", 2))
    body += network.rtattr(network.RTA_GATEWAY, socket.inet_aton("10.0.0.1"))
    body += network.rtattr(network.RTA_PREFSRC, socket.inet_aton("10.0.0.5"))
    data = network.nlmsg(network.RTM_NEWROUTE, 0, 3, body)
    [(msg_type, _flags, seq, payload)] = list(network.iter_messages(data))
    assert (msg_type, seq) == (network.RTM_NEWROUTE, 3)
    info = network.parse_route(IMDS, payload)
    assert (info.ifindex, info.gateway, info.prefsrc, info.table, info.waited) == (
        2,
        "10.0.0.1",
        "10.0.0.5",
        254,
        False,
    )


def test_error_reply_and_truncation() -> None:
    err = network.nlmsg(network.NLMSG_ERROR, 0, 9, struct.pack("=i", -errno.ENETUNREACH) + b"\0" * 16)
    [(msg_type, _flags, _seq, payload)] = list(network.iter_messages(err + b"\x01\x02"))  # trailing junk ignored
    assert msg_type == network.NLMSG_ERROR
    assert network.error_code(payload) == errno.ENETUNREACH
    assert list(network.iter_messages(err[:-4])) == []  # a length past the end is not trusted


# ---------------------------------------------------------------------------------------------
# Real netlink, in namespaces the test creates


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Namespaces]:
    with namespaces(tmp_path) as created:
        yield created


@pytest.mark.privileged
def test_returns_at_once_when_route_exists(ns: Namespaces) -> None:
    path = ns.add("vm")
    ns.add_stub_link("vm", "eth0")
    ns.sh("vm", "ip addr add 10.0.0.5/24 dev eth0; ip route add default via 10.0.0.1")
    called: list[bool] = []
    # No netns argument: the helper thread *is* in the namespace, as the agent is in the root one.
    info = run_in_netns(path, lambda: network.wait_for_route(IMDS, deadline_s=5, on_wait=lambda: called.append(True)))
    assert not info.waited
    assert called == []
    assert (info.gateway, info.prefsrc, info.table) == ("10.0.0.1", "10.0.0.5", 254)
    assert info.ifindex == int(ns.sh("vm", "ip -o link show eth0").split(":")[0])


@pytest.mark.privileged
def test_local_destination_counts(ns: Namespaces) -> None:
    path = ns.add("vm")
    ns.sh("vm", f"ip addr add {IMDS}/32 dev lo")
    info = network.wait_for_route(IMDS, deadline_s=5, netns=path)
    assert (info.ifindex, info.prefsrc, info.waited) == (1, IMDS, False)


@pytest.mark.privileged
def test_wakes_up_when_address_and_route_appear(ns: Namespaces) -> None:
    path = ns.add("vm")
    ns.add_stub_link("vm", "eth0")
    helpers: list[threading.Thread] = []

    def configure() -> None:
        # Like DHCP: the address first (an event that is not enough), then the default route.
        ns.sh("vm", "ip addr add 10.0.0.5/24 dev eth0")
        ns.sh("vm", "ip route add default via 10.0.0.1")

    def start_configuring() -> None:
        helper = threading.Thread(target=configure)
        helpers.append(helper)
        helper.start()

    info = network.wait_for_route(IMDS, deadline_s=30, netns=path, on_wait=start_configuring)
    for helper in helpers:
        helper.join()
    assert len(helpers) == 1
    assert info.waited
    assert info.events >= 1
    assert (info.gateway, info.prefsrc) == ("10.0.0.1", "10.0.0.5")


@pytest.mark.privileged
def test_route_without_source_address_keeps_waiting(ns: Namespaces) -> None:
    path = ns.add("vm")
    ns.add_stub_link("vm", "eth0")
    ns.sh("vm", "ip route add default dev eth0")  # a route, but nothing to send from yet
    threads: list[threading.Thread] = []

    def start() -> None:
        threads.append(threading.Thread(target=ns.sh, args=("vm", "ip addr add 10.0.0.7/24 dev eth0")))
        threads[0].start()

    info = network.wait_for_route(IMDS, deadline_s=30, netns=path, on_wait=start)
    threads[0].join()
    assert info.waited
    assert info.prefsrc == "10.0.0.7"
    assert info.gateway is None


@pytest.mark.privileged
def test_deadline_raises_network_unavailable(ns: Namespaces) -> None:
    path = ns.add("vm")  # only lo: the kernel answers ENETUNREACH
    with pytest.raises(NetworkUnavailable) as caught:
        network.wait_for_route(IMDS, deadline_s=0.2, netns=path)
    assert caught.value.reason == "no route to the metadata service appeared before the deadline"
    assert caught.value.supporting_data["address"] == IMDS
    assert caught.value.supporting_data["deadline_s"] == 0.2
    assert caught.value.exit_code == 69


@pytest.mark.privileged
def test_reject_route_is_not_a_route(ns: Namespaces) -> None:
    path = ns.add("vm")
    ns.add_stub_link("vm", "eth0")
    ns.sh("vm", f"ip addr add 10.0.0.5/24 dev eth0; ip route add unreachable {IMDS}/32; ip route add blackhole default")
    with pytest.raises(NetworkUnavailable):
        network.wait_for_route(IMDS, deadline_s=0.2, netns=path)


@pytest.mark.privileged
def test_deadline_zero_still_looks_once(ns: Namespaces) -> None:
    path = ns.add("vm")
    ns.sh("vm", f"ip addr add {IMDS}/32 dev lo")
    assert network.wait_for_route(IMDS, deadline_s=0, netns=path).prefsrc == IMDS


@pytest.mark.privileged
def test_injected_clock_drives_the_deadline(ns: Namespaces) -> None:
    path = ns.add("vm")
    ticks = iter([0.0, 100.0, 100.0, 100.0])  # start, then already past the deadline
    with pytest.raises(NetworkUnavailable):
        network.wait_for_route(IMDS, deadline_s=10, netns=path, clock=lambda: next(ticks))


@pytest.mark.privileged
def test_ipv6_route(ns: Namespaces) -> None:
    path = ns.add("vm")
    ns.add_stub_link("vm", "eth0")
    ns.sh("vm", "ip -6 addr add fd00:1::5/64 dev eth0 nodad; ip -6 route add default via fd00:1::1")
    info = network.wait_for_route("fd00:ec2::254", deadline_s=5, netns=path)
    assert (info.gateway, info.prefsrc) == ("fd00:1::1", "fd00:1::5")
