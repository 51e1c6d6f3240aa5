"""priority.full: the agent starts at guest-agent.service's Nice=19 and, once warm, raises
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
