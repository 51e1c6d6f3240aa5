"""The agent's CPU priority during boot: low while it starts, normal from the DHCP lease on.

guest-agent.service starts the agent at `Nice=19` with `LimitNICE=+0`: its interpreter start and
imports then use CPU that udev and systemd-networkd leave idle, so the DHCP lease is not delayed
(docs/boot-placement.md).  From the lease on, the agent is on the path to Ready and must not wait
behind the rest of the boot.  Two events raise it to the priority the unit allows:

- `on_lease()`, armed first thing in `run`: a NETLINK_ROUTE socket subscribed to IPv4 address
  events, set to signal the process (O_ASYNC, SIGIO; fcntl(2)) when a message arrives.  The
  handler runs between two bytecodes of whatever the agent is doing, imports included, and raises
  the priority when an IPv4 address appears on an interface other than lo: in a pod VM, networkd
  configuring the lease's address.  Right after arming it asks for the addresses there already
  are (an RTM_GETADDR dump, answered on the same socket), so a lease that came first counts too.
  Nothing polls, and no thread is started.
- `full()`, once warm (boot.run): in case no such event came (the address was there before the
  agent started, the agent runs by hand, or the socket could not be armed).

Without CAP_SYS_NICE a process may lower its nice value down to 20 - RLIMIT_NICE (setrlimit(2));
LimitNICE=+0 therefore means nice 0, which is as far as this goes (never above normal).  Without
such a limit nothing changes; the agent never lowers its own priority.
"""

from __future__ import annotations

import _socket
import fcntl
import os
import sys
import time

from guest_agent import network
from guest_agent.log import logger

TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # typeshed has no stub for the C module; `signal` imports enum
else:
    import _signal

log = logger("guest_agent.priority")

RTM_NEWADDR = 20  # rtnetlink(7)
RTM_GETADDR = 22
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
LO_IFINDEX = 1  # the loopback device is always ifindex 1 (net/core/dev.c)

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


def lease_address(datagram: bytes) -> bool:
    """True if the datagram announces an IPv4 address on an interface other than lo (RTM_NEWADDR,
    struct ifaddrmsg: family, prefixlen, flags, scope, index)."""
    for msg_type, _flags, _seq, payload in network.iter_messages(datagram):
        ipv4 = msg_type == RTM_NEWADDR and len(payload) >= 8 and payload[0] == _socket.AF_INET
        if ipv4 and int.from_bytes(payload[4:8], sys.byteorder) != LO_IFINDEX:  # ifa_index, host order
            return True
    return False


class LeaseWatch:
    """The armed socket; `fired` once the priority was raised by it."""

    __slots__ = ("fired", "rlimit_nice", "sock")

    def __init__(self, sock: _socket.socket, rlimit_nice: int | None) -> None:
        self.sock = sock
        self.rlimit_nice = rlimit_nice
        self.fired = False

    def on_signal(self, _signum: int, _frame: object) -> None:
        lease = False
        try:
            while True:
                lease = lease_address(self.sock.recv(65536)) or lease
        except OSError:  # drained (EAGAIN), or the socket is gone
            pass
        if lease and not self.fired:
            self.fired = True
            full(self.rlimit_nice)
            self.close()

    def close(self) -> None:
        try:
            _signal.signal(_signal.SIGIO, _signal.SIG_IGN)  # a SIGIO still queued must not end the process
        except ValueError:  # not the main thread: the handler was never installed
            pass
        self.sock.close()


def on_lease(rlimit_nice: int | None = None) -> LeaseWatch | None:
    """Arm the lease event (see the module's docstring); None when there is nothing to raise or
    the socket cannot be armed (then `full()` after the imports is what raises the priority)."""
    if os.getpriority(os.PRIO_PROCESS, 0) <= ceiling(rlimit_nice):
        return None
    try:
        sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_RAW | _socket.SOCK_CLOEXEC, _socket.NETLINK_ROUTE)
    except OSError as exc:
        log.debug("no lease event for the CPU priority: %s", exc)
        return None
    watch = LeaseWatch(sock, rlimit_nice)
    try:
        sock.setblocking(False)
        sock.bind((0, network.RTMGRP_IPV4_IFADDR))
        _signal.signal(_signal.SIGIO, watch.on_signal)  # before O_ASYNC: SIGIO's default action ends the process
        fcntl.fcntl(sock.fileno(), fcntl.F_SETOWN, os.getpid())
        fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) | os.O_ASYNC)
        # The lease may have come before the socket was armed (the unit's sandbox and the
        # interpreter start at nice 19 take seconds under QEMU TCG): ask for the IPv4 addresses
        # there are; the answer arrives as the events do, and the same handler reads it.
        ifaddrmsg = bytes([_socket.AF_INET]) + bytes(7)
        sock.sendto(network.nlmsg(RTM_GETADDR, network.NLM_F_REQUEST | NLM_F_DUMP, 1, ifaddrmsg), (0, 0))
    except (OSError, ValueError) as exc:  # ValueError: signal() outside the main thread
        log.debug("no lease event for the CPU priority: %s", exc)
        watch.close()
        return None
    return watch
