"""The agent's CPU priority during boot: low while it starts, the unit's normal once warm.

guest-agent.service starts the agent at `Nice=19` with `LimitNICE=+0`: its interpreter start and
imports then use CPU that udev and systemd-networkd leave idle, so the DHCP lease is not delayed
(docs/boot-placement.md).  Once warm (boot.run, right after `warm`), before the route wait, `full()`
raises it to the priority the unit allows: from there on it is on the path to Ready.

Raising it earlier, on the lease's own netlink address event (O_ASYNC, SIGIO), was built and
measured and then removed: under QEMU TCG the lease comes before the agent's `run` could even arm
such a socket (its sandbox setup and cold interpreter start take seconds at nice 19), and once
armed it was 0.1-0.15 s from being warm anyway (docs/boot-placement.md has the boots).

Without CAP_SYS_NICE a process may lower its nice value down to 20 - RLIMIT_NICE (setrlimit(2));
LimitNICE=+0 therefore means nice 0, which is as far as this goes (never above normal).  Without
such a limit nothing changes; the agent never lowers its own priority.
"""

from __future__ import annotations

import os
import time

from guest_agent.log import logger

log = logger("guest_agent.priority")

raised_at: float | None = None  # CLOCK_MONOTONIC of the raise, for the timeline (boot.run)


def ceiling(rlimit_nice: int | None = None) -> int:
    """The lowest nice value this process may set itself to, never below 0."""
    if rlimit_nice is None:
        import resource

        rlimit_nice = resource.getrlimit(resource.RLIMIT_NICE)[0]  # RLIM_INFINITY is -1
    return max(0, 20 - rlimit_nice) if rlimit_nice >= 0 else 0


def full(rlimit_nice: int | None = None) -> None:
    """Leave the start-up priority for the one the unit allows (its LimitNICE=)."""
    global raised_at
    target = ceiling(rlimit_nice)
    if os.getpriority(os.PRIO_PROCESS, 0) > target:
        try:
            os.setpriority(os.PRIO_PROCESS, 0, target)
        except OSError as exc:  # no setpriority in the seccomp filter: stay where systemd put us
            log.warning("cannot raise the CPU priority to nice %d: %s", target, exc)
        else:
            raised_at = time.monotonic()
