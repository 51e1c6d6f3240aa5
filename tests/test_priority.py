"""priority.full and priority.on_lease: the agent starts at guest-agent.service's Nice=19 and, once warm, raises
itself as far as the unit's LimitNICE= (RLIMIT_NICE) allows, never above nice 0.

Each case runs in a fresh interpreter started at the given nice value, the way systemd starts the
agent.  RLIMIT_NICE is handed in: raising the hard limit needs CAP_SYS_RESOURCE, which a test runner
may lack; the kernel's side (an unprivileged process may go down to 20 - RLIMIT_NICE, setrlimit(2))
is what the QEMU boots exercise with the real unit (`make e2e`, `make bench-boot`)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netutil import require_netns

REPO = Path(__file__).resolve().parents[1]

CHILD = "import os; from guest_agent import priority; priority.full({}); print(os.getpriority(os.PRIO_PROCESS, 0))"


def nice_after(start_nice: int, rlimit_nice: int | None) -> int:
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(rlimit_nice)],
        preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, start_nice),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stderr == ""  # no "cannot raise" warning
    return int(done.stdout)


needs_raise = pytest.mark.skipif(os.geteuid() != 0, reason="raising the priority here needs root's CAP_SYS_NICE")


@needs_raise
def test_limit_nice_plus_0_lets_it_return_to_nice_0() -> None:
    assert nice_after(19, 20) == 0  # LimitNICE=+0 is RLIMIT_NICE 20: nice down to 20 - 20


@needs_raise
def test_a_partial_limit_is_the_ceiling() -> None:
    assert nice_after(19, 10) == 10  # LimitNICE=+10


def test_without_a_limit_nothing_changes() -> None:
    assert nice_after(19, 0) == 19  # systemd's default: no attempt, so no warning either


@pytest.mark.skipif(resource.getrlimit(resource.RLIMIT_NICE)[0] != 0, reason="the runner has an RLIMIT_NICE")
def test_reads_rlimit_nice_itself() -> None:
    assert nice_after(19, None) == 19


@needs_raise
def test_never_lowers_its_priority_nor_goes_above_normal() -> None:
    assert nice_after(0, 20) == 0
    assert nice_after(5, 40) == 0  # LimitNICE=-20 would allow -20: the agent stops at 0
    assert nice_after(5, resource.RLIM_INFINITY) == 0


def test_the_unit_starts_low_and_allows_exactly_nice_0() -> None:
    """Nice=19 without LimitNICE=+0 and setpriority in the filter would leave the agent at nice 19
    from the lease to Ready (measured: the Ready report then waits behind APF's start)."""
    lines = [ln.strip() for ln in (REPO / "units" / "guest-agent.service").read_text().splitlines()]
    assert {"Nice=19", "LimitNICE=+0", "SystemCallFilter=setpriority"} <= set(lines)


def _newaddr(family: int, ifindex: int, msg_type: int = 20) -> bytes:
    """One rtnetlink message: nlmsghdr + ifaddrmsg (family, prefixlen, flags, scope, index)."""
    body = bytes([family, 24, 0, 0]) + ifindex.to_bytes(4, sys.byteorder)
    return (16 + len(body)).to_bytes(4, sys.byteorder) + msg_type.to_bytes(2, sys.byteorder) + bytes(10) + body


def test_only_an_ipv4_address_on_another_interface_than_lo_is_the_lease() -> None:
    import socket

    from guest_agent import priority

    assert priority.lease_address(_newaddr(socket.AF_INET, 2))
    assert priority.lease_address(_newaddr(socket.AF_INET, 1) + _newaddr(socket.AF_INET, 3))
    assert not priority.lease_address(_newaddr(socket.AF_INET, 1))  # lo
    assert not priority.lease_address(_newaddr(socket.AF_INET6, 2))
    assert not priority.lease_address(_newaddr(socket.AF_INET, 2, msg_type=21))  # RTM_DELADDR
    assert not priority.lease_address(_newaddr(socket.AF_INET, 2)[:-3])  # truncated


LEASE_CHILD = """
import os, sys, time
from guest_agent import priority
print("in its namespace", flush=True)
if {before}:
    sys.stdin.readline()  # the parent adds the address first
print("armed" if priority.on_lease(20) else "not armed", flush=True)
end = time.monotonic() + {wait_s}
while os.getpriority(os.PRIO_PROCESS, 0) == 19 and time.monotonic() < end:
    sum(range(1000))  # bytecode, as the imports are: the SIGIO handler runs between two of them
print(os.getpriority(os.PRIO_PROCESS, 0), flush=True)
"""


def nice_after_address(device: str, wait_s: float, *, before: bool = False) -> int:
    """Start a child at nice 19 in a network namespace of its own, arm on_lease, add an IPv4
    address on `device` there (lo, or a veth the test creates) after arming or, with `before`,
    before it; return the child's nice value.  Every `ip` command runs in the child's namespace,
    and only once the child has said it is in it."""
    child = subprocess.Popen(
        ["unshare", "--net", "--", sys.executable, "-c", LEASE_CHILD.format(wait_s=wait_s, before=before)],
        preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, 19),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "in its namespace"
        ns = ["nsenter", "-t", str(child.pid), "-n", "ip"]

        def add_address() -> None:
            if device != "lo":
                subprocess.run([*ns, "link", "add", device, "type", "veth", "peer", "name", device + "p"], check=True)
            subprocess.run([*ns, "addr", "add", "192.0.2.7/24", "dev", device], check=True)

        if before:
            add_address()
            child.stdin.write("go\n")
            child.stdin.flush()
        assert child.stdout.readline().strip() == "armed"
        if not before:
            add_address()
        return int(child.stdout.readline())
    finally:
        child.kill()
        child.wait()


@needs_raise
def test_the_lease_address_raises_the_priority_mid_work() -> None:
    """The address networkd sets from the DHCP lease raises the agent while it is still busy (the
    imports, in the unit), not only once it is warm."""
    require_netns()
    assert nice_after_address("d0", wait_s=30) == 0


@needs_raise
def test_a_lease_that_came_before_the_agent_armed_counts_too() -> None:
    """Under TCG the unit's sandbox and the interpreter start (at nice 19) can outlast the lease:
    the address dump asked for right after arming raises the agent as the event would."""
    require_netns()
    assert nice_after_address("d0", wait_s=30, before=True) == 0


@needs_raise
def test_an_address_on_lo_is_not_the_lease() -> None:
    require_netns()
    assert nice_after_address("lo", wait_s=1) == 19
