"""The pod network namespace and the pod's path to the metadata service.

`ensure_netns` replaces ``netns@podns.service`` (``ip netns add podns`` and
``ip netns exec podns ip link set lo up``) and `setup_imds_nat` replaces
cloud-api-adaptor's ``setup-nat-for-imds.sh``.

Threads and the caller's namespace: everything that is "host side" happens in
the namespace of the *calling thread*, which is the VM's root namespace in the
agent.  Tests call it from a thread that joined a test namespace instead.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from guest_agent.config import NFT_NAME
from guest_agent.errors import NetworkUnavailable, show
from guest_agent.network import RtnlSocket, family_of, wait_for_route
from guest_agent.podnet.nsenter import (
    MNT_DETACH,
    MS_BIND,
    MS_REC,
    MS_SHARED,
    in_thread,
    mount,
    run_in_netns,
    umount,
    unshare_net,
)

LOOPBACK_IFINDEX = 1  # the kernel gives `lo` ifindex 1 in every network namespace


def netns_path(name: str, run_dir: str) -> str:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad network namespace name: {name!r}")
    return os.path.join(run_dir, name)


def is_netns(path: str) -> bool:
    """True if `path` is a bind mount of a network namespace (nsfs), like /run/netns/<name>."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    return st.st_dev == os.stat("/proc/self/ns/net").st_dev


def _lo_up() -> None:
    with RtnlSocket.open() as rtnl:
        rtnl.link_up(LOOPBACK_IFINDEX)


def _prepare_run_dir(run_dir: str) -> None:
    """Make `run_dir` exist and be a shared mount, as `ip netns add` does.

    MS_SHARED lets namespace mounts made later propagate into mount namespaces
    cloned from this one (units with PrivateMounts=, PrivateTmp=...).  A directory
    that is not a mount point yet gets bind-mounted onto itself first (EINVAL).
    """
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    try:
        mount("none", run_dir, "none", MS_SHARED | MS_REC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        mount(run_dir, run_dir, "none", MS_BIND | MS_REC)
        mount("none", run_dir, "none", MS_SHARED | MS_REC)


def ensure_netns(name: str, *, run_dir: str = "/run/netns") -> bool:
    """Create network namespace `<run_dir>/<name>` with `lo` up; reuse an existing one.

    Returns True if it was created, False if it existed (its `lo` is set up again).
    """
    path = netns_path(name, run_dir)
    _prepare_run_dir(run_dir)
    if is_netns(path):
        run_in_netns(path, _lo_up)
        return False
    # The mount point: an empty file, mode 0 like `ip netns add`; a stale one left by a
    # crash between this step and the bind mount is reused.
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0))

    def create() -> None:
        unshare_net()
        # This thread is now alone in a new namespace; pin it to the file so it outlives the thread.
        mount(f"/proc/self/task/{threading.get_native_id()}/ns/net", path, "none", MS_BIND)
        _lo_up()

    try:
        in_thread(create, f"netns-create:{name}")
    except BaseException:
        if not is_netns(path):
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    return True


def remove_netns(name: str, *, run_dir: str = "/run/netns") -> bool:
    """Unmount and delete `<run_dir>/<name>` (`ip netns del`); False if it did not exist."""
    path = netns_path(name, run_dir)
    if not os.path.lexists(path):
        return False
    try:
        umount(path, MNT_DETACH)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):  # EINVAL: not mounted
            raise
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return True


# ---------------------------------------------------------------------------------------------
# IMDS access for the pod: proxy-ARP veth pair + MASQUERADE (setup-nat-for-imds.sh)


@dataclass(frozen=True)
class NatResult:
    pod_ip: str
    imds_addr: str
    host_veth: str
    pod_veth: str
    host_ifindex: int
    pod_ifindex: int
    pod_mac: str
    table: str
    created_veth: bool  # False when an existing pair was reused
    waited: bool  # the pod's route to IMDS was not there at the first look


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w", encoding="ascii") as f:
        f.write(value)


def _is_errno(exc: BaseException, code: int) -> bool:
    return getattr(exc, "code", None) == code or getattr(exc, "errno", None) == code


def _iproute() -> Any:
    """pyroute2's IPRoute, imported only by the commands that use it (130-250 ms, network.py).

    Every version from 0.7.2 to 0.9.x joins no multicast group until bind(), which this code never
    calls: the socket reads only the answers to its own requests.  (0.7.2 refuses ``groups=``.)
    """
    from pyroute2 import IPRoute

    return IPRoute()


def _pod_link(pod_veth: str) -> int | None:
    with _iproute() as ipr:
        found = ipr.link_lookup(ifname=pod_veth)
        return int(found[0]) if found else None


def _pod_side(pod_veth: str, imds_addr: str) -> tuple[int, str]:
    """In the pod namespace: veth up, route to IMDS through it; return (ifindex, MAC)."""
    with _iproute() as ipr:
        found = ipr.link_lookup(ifname=pod_veth)
        if not found:
            raise NetworkUnavailable("the pod end of the IMDS veth pair is missing", device=pod_veth)
        index = int(found[0])
        ipr.link("set", index=index, state="up")
        # More specific than the pod's default route (through APF's vxlan), so IMDS goes via the veth.
        ipr.route("replace", dst=imds_addr, dst_len=32, oif=index)
        mac = str(ipr.get_links(index)[0].get_attr("IFLA_ADDRESS"))
        return index, mac


# Table names follow config.py's rule for [netns] nft_table (NFT_NAME).  nft's parser also refuses
# its own keywords as names (`masquerade`, `counter`...); nft reports those, and the reason below
# carries its message.
NFT_TIMEOUT_S = 30.0
NFT_STDERR_SHOWN = 400  # characters of nft's error message kept in the error's supporting data


def masquerade_ruleset(table: str, pod_ip: str, imds_addr: str) -> str:
    """The `nft -f` input that replaces table `ip <table>` by one postrouting MASQUERADE rule.

    nft applies a file as one transaction: the table is declared (a no-op if it exists, so the
    delete cannot fail), deleted and made again.  A rerun leaves exactly one rule; a refused file
    leaves the previous table untouched.  A table of our own does not clash with iptables-nft's
    `ip nat` or APF's rules.  ValueError for a name or address config.py would have refused.
    """
    if not NFT_NAME.fullmatch(table):
        raise ValueError(f"bad nftables table name: {table!r}")
    src, dst = ipaddress.IPv4Address(pod_ip), ipaddress.IPv4Address(imds_addr)
    return (
        f"table ip {table}\n"
        f"delete table ip {table}\n"
        f"table ip {table} {{\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority 100; policy accept;\n"
        f"\t\tip saddr {src} ip daddr {dst} masquerade\n"
        "\t}\n"
        "}\n"
    )


def load_nft(ruleset: str, *, table: str, nft: Sequence[str] = ("nft",), timeout_s: float = NFT_TIMEOUT_S) -> None:
    """Run `nft -f -` on `ruleset` in the calling thread's network namespace (the child inherits it).

    Every failure is NetworkUnavailable (exit 69, the unit retries) with nft's message, bounded.
    """
    argv = [*nft, "-f", "-"]
    try:
        done = subprocess.run(argv, input=ruleset.encode(), capture_output=True, timeout=timeout_s, check=False)
    except FileNotFoundError as exc:
        raise NetworkUnavailable("the nft command is missing (package nftables)", command=argv[0]) from exc
    except subprocess.TimeoutExpired as exc:
        reason = "nft did not load the IMDS NAT rules in time"
        raise NetworkUnavailable(reason, table=table, timeout_s=timeout_s) from exc
    except OSError as exc:
        raise NetworkUnavailable("the nft command could not be run", command=argv[0], error=exc.strerror) from exc
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()
        raise NetworkUnavailable(
            "nft refused the IMDS NAT rules",
            table=table,
            status=done.returncode,
            nft=show(message, NFT_STDERR_SHOWN),
        )


def setup_imds_nat(
    *,
    netns: str,
    run_dir: str,
    imds_addr: str,
    table: str = "guest_agent",
    deadline_s: float,
    pod_ip: str | None = None,
    host_veth: str = "veth1",
    pod_veth: str = "veth2",
    host_addr: str = "169.254.99.99",
    clock: Callable[[], float] = time.monotonic,
    nft: Sequence[str] = ("nft",),
) -> NatResult:
    """Give the pod namespace a path to the metadata service, idempotently.

    Unless `pod_ip` is given, waits (rtnetlink events in the pod namespace, up to
    `deadline_s`) until the pod has a route to `imds_addr`, which APF creates, and
    takes the pod IP from its source address; with `pod_ip` it does not wait.  Then: veth pair `host_veth` (here,
    with `host_addr`/32 so proxy ARP answers) / `pod_veth` (in the pod), forwarding
    and proxy ARP, a /32 route to IMDS via the veth in the pod, the return route
    and a permanent neighbour entry here (pyroute2), and a MASQUERADE rule in nft
    table `table`, loaded by the `nft` command in one transaction.  A rerun reuses
    the veth pair and rebuilds the table (one rule).  Host-side steps act on the
    calling thread's network namespace.  IPv4 only.
    """
    if family_of(imds_addr) != socket.AF_INET:
        raise ValueError("the IMDS NAT is IPv4 only")
    path = netns_path(netns, run_dir)
    if not is_netns(path):
        raise NetworkUnavailable("the pod network namespace does not exist", netns=path)
    waited = False
    if pod_ip is None:
        try:
            route = wait_for_route(imds_addr, deadline_s=deadline_s, netns=path, clock=clock)
        except NetworkUnavailable as exc:
            raise NetworkUnavailable(
                "the pod network namespace got no route to the metadata service before the deadline",
                netns=path,
                address=imds_addr,
                deadline_s=deadline_s,
            ) from exc
        assert route.prefsrc is not None  # wait_for_route requires a source address
        pod_ip, waited = route.prefsrc, route.waited
    ruleset = masquerade_ruleset(table, pod_ip, imds_addr)  # ValueError for a name, not an address

    created = False
    with _iproute() as host:
        found = host.link_lookup(ifname=host_veth)
        pod_index = run_in_netns(path, lambda: _pod_link(pod_veth))
        if not (found and pod_index):
            # Missing or half-made pair (say, a crash before the pod end moved): start over.
            if found:
                host.link("del", index=found[0])
            if pod_index:
                run_in_netns(path, lambda: _del_link(pod_veth))
            ns_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                # One request creates both ends, the peer directly in the pod namespace.
                host.link("add", ifname=host_veth, kind="veth", peer={"ifname": pod_veth, "net_ns_fd": ns_fd})
            finally:
                os.close(ns_fd)
            created = True
            found = host.link_lookup(ifname=host_veth)
        host_index = int(found[0])
        # Proxy ARP stays silent on an interface with no IPv4 address.
        try:
            host.addr("add", index=host_index, address=host_addr, prefixlen=32)
        except Exception as exc:
            if not _is_errno(exc, errno.EEXIST):
                raise
        host.link("set", index=host_index, state="up")
        _write_sysctl("/proc/sys/net/ipv4/ip_forward", "1")
        _write_sysctl(f"/proc/sys/net/ipv4/conf/{host_veth}/proxy_arp", "1")
        _write_sysctl(f"/proc/sys/net/ipv4/neigh/{host_veth}/proxy_delay", "0")

        pod_index, mac = run_in_netns(path, lambda: _pod_side(pod_veth, imds_addr))

        host.route("replace", dst=pod_ip, dst_len=32, oif=host_index)
        # A permanent entry: replies to the pod need no ARP across the veth.
        host.neigh("replace", dst=pod_ip, lladdr=mac, ifindex=host_index, state="permanent")

    load_nft(ruleset, table=table, nft=nft)
    return NatResult(
        pod_ip=pod_ip,
        imds_addr=imds_addr,
        host_veth=host_veth,
        pod_veth=pod_veth,
        host_ifindex=host_index,
        pod_ifindex=pod_index,
        pod_mac=mac,
        table=table,
        created_veth=created,
        waited=waited,
    )


def _del_link(ifname: str) -> None:
    with _iproute() as ipr:
        for index in ipr.link_lookup(ifname=ifname):
            ipr.link("del", index=index)
