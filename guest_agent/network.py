"""Wait for a route to the metadata address, driven by rtnetlink events.

This sits on the boot's critical path (before the first metadata request), so
it speaks rtnetlink through a raw ``AF_NETLINK``/``NETLINK_ROUTE`` socket from
the standard library instead of pyroute2.  Measured with ``python -X importtime``
(Python 3.11.7, pyroute2 0.9.7, warm page cache, 3 runs each):

* ``import pyroute2``: 129-249 ms.  Any submodule (``pyroute2.netlink.rtnl``,
  ``pyroute2.iproute``, ``pyroute2.netns``) costs the same, 131-190 ms, because
  the package ``__init__`` imports everything (IPDB, NDB, conntrack, asyncio).
* ``socket`` + ``select`` + ``struct`` + ``errno``: about 7 ms, and ``socket``
  is imported by the HTTP client anyway; this module itself adds about 3.5 ms.
* A call when the route already exists (two sockets, one request): about 0.3 ms.

What is needed here is small: one ``RTM_GETROUTE`` request ("ip route get"),
its reply (``RTM_NEWROUTE`` or ``NLMSG_ERROR``) and "something changed"
wake-ups from the multicast groups.  pyroute2 stays the tool for the pod
network namespace and the IMDS NAT (:mod:`guest_agent.podnet`), which run after
READY=1.

Race-free order: the event socket joins the groups *before* the route lookup,
so a route that appears between the lookup and the wait still wakes us up.
Events are not parsed: any address, route or link message is a reason to ask
the kernel again, which also covers changes that produce no route message
(carrier coming up under an existing route) and an overrun event queue
(``ENOBUFS``).  The deadline is the ``poll`` timeout; nothing sleeps.

One wake-up is not announced: the kernel sends ``RTM_NEWADDR`` *before* it updates what
source-address selection uses (``__inet_insert_ifa`` in net/ipv4/devinet.c: "Send message
first, then call notifier"; the FIB's cached source per next hop is refreshed only when the
notifier bumps ``dev_addr_genid``).  A lookup that runs right after the address event, on the
other CPU, can still see the route without a source address, and nothing else may follow: in
2 of 15 boots under QEMU (networkd's routes are on-link and exist before the lease) the agent
then slept until the deadline.  So after a lookup that finds a route but no source address,
the loop looks once more after ``SOURCE_RECHECK_S`` even if no event comes.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from guest_agent.errors import NetworkUnavailable

# <linux/netlink.h>
NLMSG_HDR = struct.Struct("=IHHII")  # nlmsg_len, nlmsg_type, nlmsg_flags, nlmsg_seq, nlmsg_pid
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

# <linux/rtnetlink.h>
RTM_NEWLINK = 16
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTMGRP_LINK = 0x1
RTMGRP_IPV4_IFADDR = 0x10
RTMGRP_IPV4_ROUTE = 0x40
RTMGRP_IPV6_IFADDR = 0x100
RTMGRP_IPV6_ROUTE = 0x400
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTA_HDR = struct.Struct("=HH")  # rta_len, rta_type
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PREFSRC = 7
RTA_TABLE = 15
RT_TABLE_MAIN = 254

# <linux/if_link.h>, <linux/if.h>
IFINFOMSG = struct.Struct("=BxHiII")  # family, pad, type, index, flags, change
IFF_UP = 0x1

# The kernel answers "route get" with these when the lookup ends in no route or in a
# reject route: ENETUNREACH (no route), EHOSTUNREACH (`unreachable`), EACCES
# (`prohibit`), EINVAL (`blackhole`), EAGAIN (`throw` to an empty table).
# They all mean "not yet": keep waiting.
NO_ROUTE_ERRNOS = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EACCES, errno.EINVAL, errno.EAGAIN})

RECV_BUF = 65536
# After a route without a source address: look again this soon even without an event (see the
# module docstring).  The kernel updates source selection microseconds after the address event.
SOURCE_RECHECK_S = 0.02


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """The kernel's answer to "ip route get <dst>"."""

    dst: str
    ifindex: int  # RTA_OIF (1 = lo when dst is a local address)
    gateway: str | None  # RTA_GATEWAY; None for an on-link destination
    prefsrc: str | None  # RTA_PREFSRC: the source address the kernel would pick
    table: int
    waited: bool  # False: the route was there at the first look
    events: int = 0  # netlink wake-ups seen before the route appeared


# ---------------------------------------------------------------------------------------------
# Pure build/parse functions


def family_of(address: str) -> int:
    """AF_INET or AF_INET6 for a literal address; ValueError otherwise (no DNS here)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, address)
        except OSError:
            continue
        return family
    raise ValueError(f"not an IP address: {address!r}")


def rtattr(rta_type: int, payload: bytes) -> bytes:
    length = RTA_HDR.size + len(payload)
    return RTA_HDR.pack(length, rta_type) + payload + b"\0" * (-length % 4)


def nlmsg(msg_type: int, flags: int, seq: int, body: bytes) -> bytes:
    return NLMSG_HDR.pack(NLMSG_HDR.size + len(body), msg_type, flags, seq, 0) + body


def build_route_get(dst: str, seq: int) -> bytes:
    """RTM_GETROUTE for one host address, as `ip route get <dst>` sends it (no NLM_F_DUMP)."""
    family = family_of(dst)
    raw = socket.inet_pton(family, dst)
    rtm = RTMSG.pack(family, len(raw) * 8, 0, 0, 0, 0, 0, 0, 0)
    return nlmsg(RTM_GETROUTE, NLM_F_REQUEST, seq, rtm + rtattr(RTA_DST, raw))


def build_link_up(ifindex: int, seq: int) -> bytes:
    """RTM_NEWLINK that sets IFF_UP on an existing link ("ip link set <dev> up"), with an ACK."""
    ifi = IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, IFF_UP, IFF_UP)
    return nlmsg(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, seq, ifi)


def iter_messages(data: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, payload) for each netlink message in one datagram."""
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, msg_type, flags, seq, _pid = NLMSG_HDR.unpack_from(data, offset)
        if length < NLMSG_HDR.size or offset + length > len(data):
            break  # truncated or corrupt: stop rather than loop
        yield msg_type, flags, seq, data[offset + NLMSG_HDR.size : offset + length]
        offset += (length + 3) & ~3


def iter_rtattrs(data: bytes, offset: int) -> Iterator[tuple[int, bytes]]:
    while offset + RTA_HDR.size <= len(data):
        length, rta_type = RTA_HDR.unpack_from(data, offset)
        if length < RTA_HDR.size or offset + length > len(data):
            break
        yield rta_type & 0x3FFF, data[offset + RTA_HDR.size : offset + length]  # strip NLA_F_* flags
        offset += (length + 3) & ~3


def error_code(payload: bytes) -> int:
    """The positive errno of an NLMSG_ERROR payload; 0 is an ACK."""
    (err,) = struct.unpack_from("=i", payload)
    return -int(err)


def parse_route(dst: str, payload: bytes, *, waited: bool = False, events: int = 0) -> RouteInfo:
    """An RTM_NEWROUTE reply to "route get" as a RouteInfo."""
    family, _dst_len, _src_len, _tos, table, _proto, _scope, _type, _flags = RTMSG.unpack_from(payload)
    ifindex = 0
    gateway = prefsrc = None
    for rta_type, value in iter_rtattrs(payload, RTMSG.size):
        if rta_type == RTA_OIF:
            (ifindex,) = struct.unpack("=I", value[:4])
        elif rta_type == RTA_GATEWAY:
            gateway = socket.inet_ntop(family, value)
        elif rta_type == RTA_PREFSRC:
            prefsrc = socket.inet_ntop(family, value)
        elif rta_type == RTA_TABLE:
            (table,) = struct.unpack("=I", value[:4])
    return RouteInfo(dst, ifindex, gateway, prefsrc, table, waited, events)


# ---------------------------------------------------------------------------------------------
# Thin I/O


class RtnlSocket:
    """A NETLINK_ROUTE socket for request/reply, optionally in another network namespace."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0

    @classmethod
    def open(cls, *, groups: int = 0, netns: str | None = None) -> RtnlSocket:
        return cls(open_rtnl(groups=groups, netns=netns))

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, build: Callable[[int], bytes]) -> tuple[int, bytes]:
        """Send one request; return the (type, payload) of the reply with our sequence number.

        rtnetlink handles a request synchronously in sendto(), so the reply is already
        queued when it returns; the socket timeout only guards against a kernel bug.
        """
        self.seq += 1
        seq = self.seq
        self.sock.sendto(build(seq), (0, 0))
        while True:
            data = self.sock.recv(RECV_BUF)
            for msg_type, _flags, msg_seq, payload in iter_messages(data):
                if msg_seq == seq and msg_type != NLMSG_DONE:
                    return msg_type, payload

    def route_get(self, dst: str) -> tuple[int, bytes]:
        """(0, rtmsg payload) for a route, or (errno, b"") for an error reply."""
        msg_type, payload = self.request(lambda seq: build_route_get(dst, seq))
        if msg_type == NLMSG_ERROR:
            return error_code(payload), b""
        if msg_type != RTM_NEWROUTE:
            raise OSError(errno.EPROTO, f"unexpected rtnetlink reply type {msg_type} to RTM_GETROUTE")
        return 0, payload

    def link_up(self, ifindex: int) -> None:
        msg_type, payload = self.request(lambda seq: build_link_up(ifindex, seq))
        code = error_code(payload) if msg_type == NLMSG_ERROR else 0
        if code:
            raise OSError(code, f"could not set link {ifindex} up: {os.strerror(code)}")


def open_rtnl(*, groups: int = 0, netns: str | None = None, timeout: float = 5.0) -> socket.socket:
    """A bound NETLINK_ROUTE socket, created in `netns` (a path such as /run/netns/podns) if given.

    `timeout` 0 makes it non-blocking (the event socket: poll() waits, recv() drains).
    """

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            sock.settimeout(timeout)
            sock.bind((0, groups))
        except BaseException:
            sock.close()
            raise
        return sock

    if netns is None:
        return make()
    from guest_agent.podnet.nsenter import run_in_netns  # ctypes only when a namespace is involved

    return run_in_netns(netns, make)


def drain(sock: socket.socket) -> int:
    """Read every queued datagram from a non-blocking socket; return how many were read."""
    count = 0
    while True:
        try:
            sock.recv(RECV_BUF)
        except BlockingIOError:
            return count
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:  # overrun: events were lost, which only means "look again"
                raise
        count += 1


def _lookup(query: RtnlSocket, dst: str, *, waited: bool, events: int) -> RouteInfo | None:
    code, payload = query.route_get(dst)
    if code in NO_ROUTE_ERRNOS:
        return None
    if code:
        raise OSError(code, f"route lookup for {dst} failed: {os.strerror(code)}")
    return parse_route(dst, payload, waited=waited, events=events)


def await_route(
    look: Callable[[bool, int], RouteInfo | None],
    wait: Callable[[float], int | None],
    *,
    deadline: float,
    require_prefsrc: bool,
    clock: Callable[[], float],
    on_wait: Callable[[], None] | None = None,
) -> RouteInfo | None:
    """The wait loop without the sockets: `look(waited, events)` asks the kernel, `wait(timeout_s)`
    blocks for events and returns how many it drained (None: the timeout passed).  Returns the
    usable route, or None at the deadline."""

    def usable(info: RouteInfo | None) -> bool:
        return info is not None and (info.prefsrc is not None or not require_prefsrc)

    info = look(False, 0)
    if usable(info):
        return info
    if on_wait is not None:
        on_wait()
    events = 0
    recheck = info is not None  # a route without a source address: look again soon (module docstring)
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            break
        got = wait(min(remaining, SOURCE_RECHECK_S) if recheck else remaining)
        if got is None and not recheck:
            continue
        events += got or 0
        info = look(True, events)
        if usable(info):
            return info
        # Only the first look after an event rechecks: a route that has no source address for a
        # while (on-link routes before the lease) then costs one extra lookup per event, no polling.
        recheck = got is not None and info is not None
    # One last look: costs microseconds and closes any gap at the very end.
    info = look(True, events)
    return info if usable(info) else None


def wait_for_route(
    dst: str,
    *,
    deadline_s: float,
    netns: str | None = None,
    require_prefsrc: bool = True,
    on_wait: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> RouteInfo:
    """Return the kernel's route to `dst`, waiting up to `deadline_s` for one to appear.

    Returns at once (``waited=False``) when a route exists.  Otherwise it blocks in
    poll() on an rtnetlink event socket and asks again after every address, route or
    link event.  `netns` is the path of a network namespace file to look in (the
    caller's own namespace when None).  `on_wait` is called once, just before the
    first block, for a log line.  `require_prefsrc`: a route with no source address
    to send from does not count.  Raises NetworkUnavailable at the deadline.
    """
    family = family_of(dst)
    groups = RTMGRP_LINK | (
        RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE if family == socket.AF_INET else RTMGRP_IPV6_IFADDR | RTMGRP_IPV6_ROUTE
    )
    deadline = clock() + deadline_s
    events_sock = open_rtnl(groups=groups, netns=netns, timeout=0.0)  # subscribe first ...
    try:
        with RtnlSocket.open(netns=netns) as query:
            poller = select.poll()
            poller.register(events_sock.fileno(), select.POLLIN)

            def wait(timeout_s: float) -> int | None:
                # poll() takes whole milliseconds; round up so we never spin just short of the deadline.
                if not poller.poll(int(timeout_s * 1000) + 1):
                    return None
                return drain(events_sock)

            info = await_route(
                lambda waited, events: _lookup(query, dst, waited=waited, events=events),  # ... then look
                wait,
                deadline=deadline,
                require_prefsrc=require_prefsrc,
                clock=clock,
                on_wait=on_wait,
            )
            if info is not None:
                return info
    finally:
        events_sock.close()
    raise NetworkUnavailable(
        "no route to the metadata service appeared before the deadline",
        address=dst,
        deadline_s=deadline_s,
        netns=netns or "host",
    )
