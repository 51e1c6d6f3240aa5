from __future__ import annotations

import http.client
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from guest_agent.errors import NetworkUnavailable
from guest_agent.network import RtnlSocket
from guest_agent.podnet import netns
from tests.netutil import Namespaces, host_snapshot, mountinfo, namespaces

IMDS = "169.254.169.254"
TABLE = f"ga_test_{os.getpid()}"  # unique, so a leak into the host namespace would be visible


@pytest.fixture
def ns(tmp_path: Path) -> Iterator[Namespaces]:
    with namespaces(tmp_path) as created:
        yield created


def lo_is_up(ns: Namespaces, name: str) -> bool:
    flags = ns.sh(name, "ip -o link show lo").split("<", 1)[1].split(">", 1)[0].split(",")
    return "UP" in flags


# ---------------------------------------------------------------------------------------------
# ensure_netns / remove_netns


def test_bad_names_are_refused(tmp_path: Path) -> None:
    for name in ("", ".", "..", "a/b"):
        with pytest.raises(ValueError):
            netns.netns_path(name, str(tmp_path))


@pytest.mark.privileged
def test_create_then_reuse(ns: Namespaces) -> None:
    path = ns.path("podns")
    assert netns.ensure_netns("podns", run_dir=ns.run_dir) is True
    ns.names.append("podns")
    assert netns.is_netns(path)
    assert os.stat(path).st_ino != os.stat("/proc/self/ns/net").st_ino  # a new namespace, not ours
    assert lo_is_up(ns, "podns")
    inode = os.stat(path).st_ino

    ns.sh("podns", "ip link set lo down")
    assert netns.ensure_netns("podns", run_dir=ns.run_dir) is False
    assert os.stat(path).st_ino == inode  # the same namespace, reused
    assert lo_is_up(ns, "podns")  # and lo is up again


@pytest.mark.privileged
def test_run_dir_is_a_shared_mount(ns: Namespaces) -> None:
    ns.add("podns")
    real = os.path.realpath(ns.run_dir)
    entries = [fields for fields in mountinfo() if fields[4] == real]
    assert entries
    assert any(field.startswith("shared:") for field in entries[-1][6:])


@pytest.mark.privileged
def test_stale_mount_point_file_is_reused(ns: Namespaces) -> None:
    os.makedirs(ns.run_dir, exist_ok=True)
    path = ns.path("podns")
    with open(path, "w"):
        pass  # as left by a crash between creating the file and the bind mount
    assert not netns.is_netns(path)
    assert netns.ensure_netns("podns", run_dir=ns.run_dir) is True
    ns.names.append("podns")
    assert netns.is_netns(path)


@pytest.mark.privileged
def test_remove(ns: Namespaces) -> None:
    path = ns.add("podns")
    assert netns.remove_netns("podns", run_dir=ns.run_dir) is True
    assert not os.path.lexists(path)
    assert netns.remove_netns("podns", run_dir=ns.run_dir) is False


@pytest.mark.privileged
def test_run_in_netns_leaves_the_caller_alone(ns: Namespaces) -> None:
    path = ns.add("podns")
    before = os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino
    inside = netns.run_in_netns(path, lambda: os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino)
    assert inside == os.stat(path).st_ino
    assert os.stat(f"/proc/self/task/{threading.get_native_id()}/ns/net").st_ino == before

    def boom() -> None:
        raise RuntimeError("from the namespace thread")

    with pytest.raises(RuntimeError, match="from the namespace thread"):
        netns.run_in_netns(path, boom)


@pytest.mark.privileged
def test_sockets_keep_their_namespace(ns: Namespaces) -> None:
    path = ns.add("podns")
    ns.sh("podns", f"ip addr add {IMDS}/32 dev lo")
    with RtnlSocket(netns.run_in_netns(path, lambda: RtnlSocket.open().sock)) as rtnl:
        code, _ = rtnl.route_get(IMDS)  # answered by the pod namespace, used from this thread
    assert code == 0


# ---------------------------------------------------------------------------------------------
# setup_imds_nat: the whole path from the pod to a fake metadata server


class FakeImds(http.server.BaseHTTPRequestHandler):
    clients: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        FakeImds.clients.append(self.client_address[0])
        body = b"user-data"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def require_nftables(ns: Namespaces) -> None:
    if shutil.which("nft") is None:
        pytest.skip("needs the nft command (Debian package nftables)")
    ns.add("nftprobe")
    try:
        ns.sh("nftprobe", "nft 'add table ip probe; add chain ip probe p { type nat hook postrouting priority 100; }'")
    except AssertionError as exc:
        pytest.skip(f"nf_tables with NAT chains is not available: {exc}")


@pytest.fixture
def topology(ns: Namespaces) -> Iterator[Namespaces]:
    """cloud (fake IMDS) <-veth-> vm (plays the VM's root namespace) ; pod (APF-style address + route).

    The metadata server sits one hop away from "vm" as on a real cloud, so the pod's packets are
    forwarded and leave through postrouting, where MASQUERADE applies.
    """
    require_nftables(ns)
    cloud, vm = ns.add("cloud"), ns.add("vm")
    ns.add("pod")
    ns.sh("cloud", f"ip link add cl0 type veth peer name eth0 netns {vm}")
    ns.sh("cloud", f"ip addr add 10.99.0.1/24 dev cl0; ip link set cl0 up; ip addr add {IMDS}/32 dev lo")
    ns.sh("vm", "ip addr add 10.99.0.2/24 dev eth0; ip link set eth0 up; ip route add default via 10.99.0.1")
    # What APF leaves in the pod namespace: the pod IP on eth0 (a vxlan there) and a default route.
    ns.add_stub_link("pod", "eth0")
    ns.sh("pod", "ip addr add 10.200.0.5/24 dev eth0; ip route add default via 10.200.0.1")

    FakeImds.clients = []
    server = netns.run_in_netns(cloud, lambda: http.server.HTTPServer((IMDS, 80), FakeImds))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield ns
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def fetch_from_pod(ns: Namespaces, timeout: float = 10) -> bytes:
    def get() -> bytes:
        conn = http.client.HTTPConnection(IMDS, 80, timeout=timeout)
        try:
            conn.request("GET", "/metadata")
            return conn.getresponse().read()
        finally:
            conn.close()

    return netns.run_in_netns(ns.path("pod"), get)


def masquerade_rules(ns: Namespaces) -> int:
    return ns.sh("vm", f"nft list table ip {TABLE}").count("masquerade")


def setup_in_vm(
    ns: Namespaces,
    *,
    pod_ip: str | None = None,
    host_veth: str = "veth1",
    pod_veth: str = "veth2",
    table: str = TABLE,
    nft: tuple[str, ...] = ("nft",),
) -> netns.NatResult:
    """Run setup_imds_nat from a thread whose namespace is the test's "vm" (the agent's root namespace)."""
    return netns.run_in_netns(
        ns.path("vm"),
        lambda: netns.setup_imds_nat(
            netns="pod",
            run_dir=ns.run_dir,
            imds_addr=IMDS,
            table=table,
            deadline_s=10,
            pod_ip=pod_ip,
            host_veth=host_veth,
            pod_veth=pod_veth,
            nft=nft,
        ),
    )


@pytest.mark.privileged
def test_imds_nat_end_to_end(topology: Namespaces) -> None:
    ns = topology
    host_before = host_snapshot()
    with pytest.raises(OSError):
        fetch_from_pod(ns, timeout=0.5)  # the pod's default route leads nowhere yet

    result = setup_in_vm(ns)
    assert result.pod_ip == "10.200.0.5"
    assert result.created_veth
    assert fetch_from_pod(ns) == b"user-data"
    assert FakeImds.clients == ["10.99.0.2"]  # masqueraded to the VM's address, not the pod's
    assert masquerade_rules(ns) == 1
    assert f"10.200.0.5 lladdr {result.pod_mac} PERMANENT" in ns.sh("vm", "ip neigh show dev veth1")
    assert f"{IMDS} dev veth2" in ns.sh("pod", "ip route show")
    assert ns.sh("vm", "cat /proc/sys/net/ipv4/conf/veth1/proxy_arp") == "1\n"
    assert ns.sh("vm", "cat /proc/sys/net/ipv4/neigh/veth1/proxy_delay") == "0\n"
    assert ns.sh("vm", "cat /proc/sys/net/ipv4/ip_forward") == "1\n"

    again = setup_in_vm(ns)  # idempotent: no error, same pair, one rule
    assert not again.created_veth
    assert (again.host_ifindex, again.pod_mac) == (result.host_ifindex, result.pod_mac)
    assert masquerade_rules(ns) == 1
    assert fetch_from_pod(ns) == b"user-data"
    assert FakeImds.clients == ["10.99.0.2", "10.99.0.2"]

    links_after, tables_after = host_snapshot()
    assert not ({"veth1", "veth2"} & (links_after - host_before[0]))
    assert not any(TABLE in t for t in tables_after)


@pytest.mark.privileged
def test_imds_nat_repairs_a_half_made_pair(topology: Namespaces) -> None:
    ns = topology
    ns.sh("vm", "ip link add veth1 type veth peer name veth2")  # a crash before the pod end moved
    result = setup_in_vm(ns)
    assert result.created_veth
    assert fetch_from_pod(ns) == b"user-data"
    assert "veth2" not in ns.sh("vm", "ip -o link show")


@pytest.mark.privileged
def test_imds_nat_with_given_pod_ip_and_names(topology: Namespaces) -> None:
    ns = topology
    result = setup_in_vm(ns, pod_ip="10.200.0.5", host_veth="ga-imds0", pod_veth="ga-imds1")
    assert (result.host_veth, result.pod_veth, result.waited) == ("ga-imds0", "ga-imds1", False)
    assert fetch_from_pod(ns) == b"user-data"


@pytest.mark.privileged
def test_imds_nat_rerun_replaces_the_table(topology: Namespaces) -> None:
    ns = topology
    setup_in_vm(ns)
    ns.sh("vm", f"nft add rule ip {TABLE} postrouting ip daddr 10.9.9.9 masquerade")  # stray extra rule
    assert masquerade_rules(ns) == 2
    setup_in_vm(ns)
    assert masquerade_rules(ns) == 1
    assert "10.9.9.9" not in ns.sh("vm", f"nft list table ip {TABLE}")


@pytest.mark.privileged
def test_imds_nat_refused_file_changes_no_rule(topology: Namespaces) -> None:
    """nft applies the file as one transaction: a refused line at its end undoes the delete too."""
    ns = topology
    setup_in_vm(ns)
    before = ns.sh("vm", f"nft list table ip {TABLE}")
    # The real nft, given our file plus one line it refuses (the appended "-f -" become $1 $2).
    broken = ("sh", "-c", "{ cat; echo 'add rule ip nosuchtable nosuchchain accept'; } | nft -f -", "nft")
    with pytest.raises(NetworkUnavailable) as caught:
        setup_in_vm(ns, nft=broken)
    assert caught.value.reason == "nft refused the IMDS NAT rules"
    assert caught.value.supporting_data["status"] == 1
    assert "nosuchtable" in caught.value.supporting_data["nft"]
    assert ns.sh("vm", f"nft list table ip {TABLE}") == before
    assert fetch_from_pod(ns) == b"user-data"


@pytest.mark.privileged
def test_imds_nat_keyword_table_name_is_nfts_error(topology: Namespaces) -> None:
    """config.py admits any identifier; nft refuses its own keywords as names, and says so."""
    with pytest.raises(NetworkUnavailable) as caught:
        setup_in_vm(topology, table="masquerade")
    assert caught.value.reason == "nft refused the IMDS NAT rules"
    assert "syntax error" in caught.value.supporting_data["nft"]


@pytest.mark.privileged
def test_imds_nat_deadline_without_pod_route(ns: Namespaces) -> None:
    ns.add("vm")
    ns.add("pod")  # APF never configured it
    with pytest.raises(NetworkUnavailable) as caught:
        netns.run_in_netns(
            ns.path("vm"),
            lambda: netns.setup_imds_nat(netns="pod", run_dir=ns.run_dir, imds_addr=IMDS, deadline_s=0.2),
        )
    assert "pod network namespace" in caught.value.reason
    assert caught.value.supporting_data["deadline_s"] == 0.2


@pytest.mark.privileged
def test_imds_nat_missing_namespace(ns: Namespaces) -> None:
    os.makedirs(ns.run_dir, exist_ok=True)
    vm = ns.add("vm")
    with pytest.raises(NetworkUnavailable, match="does not exist"):
        netns.run_in_netns(
            vm, lambda: netns.setup_imds_nat(netns="nope", run_dir=ns.run_dir, imds_addr=IMDS, deadline_s=0.1)
        )


# ---------------------------------------------------------------------------------------------
# `guest-agent netns imds-nat`: the entry point of guest-agent-imds-nat.service


URL_KEY = {"aws": "aws.imds_url", "openstack": "openstack.metadata_url"}


def imds_nat_command(
    ns: Namespaces, tmp_path: Path, conf: str = "", table: str = TABLE, provider: str = "aws"
) -> subprocess.Popen[str]:
    """Start the command as its unit would, in the test's "vm" namespace (the VM's root namespace)."""
    section, _, key = URL_KEY[provider].partition(".")
    cfg = tmp_path / "nat.toml"
    cfg.write_text(
        f'provider = "{provider}"\n[netns]\nname = "pod"\nrun_dir = "{ns.run_dir}"\nnft_table = "{table}"\n'
        f'imds_nat_deadline_s = 20.0\n{conf}[{section}]\n{key} = "http://{IMDS}"\n'
    )
    argv = [sys.executable, "-m", "guest_agent", "netns", "imds-nat", "--config", str(cfg)]
    return subprocess.Popen(["nsenter", f"--net={ns.path('vm')}", *argv], stderr=subprocess.PIPE, text=True)


@pytest.mark.privileged
@pytest.mark.parametrize("provider", sorted(URL_KEY))
def test_imds_nat_command_waits_for_the_pod_address(topology: Namespaces, tmp_path: Path, provider: str) -> None:
    ns = topology
    ns.sh("pod", "ip addr flush dev eth0")  # APF has not given the pod its address yet
    proc = imds_nat_command(ns, tmp_path, provider=provider)
    assert proc.stderr is not None
    try:
        line = proc.stderr.readline()  # it logs once before it blocks on rtnetlink events
        assert "waiting for the pod's route" in line
        ns.sh("pod", "ip addr add 10.200.0.5/24 dev eth0; ip route add default via 10.200.0.1")
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()
    assert "set up: 10.200.0.5 -> 169.254.169.254" in proc.stderr.read()
    assert fetch_from_pod(ns) == b"user-data"
    assert masquerade_rules(ns) == 1


@pytest.mark.privileged
def test_imds_nat_command_fails_for_its_unit_to_retry(ns: Namespaces, tmp_path: Path) -> None:
    ns.add("vm")  # no "pod" namespace: netns@pod.service did not run
    proc = imds_nat_command(ns, tmp_path)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 69
    assert "does not exist" in err


@pytest.mark.privileged
def test_imds_nat_command_reports_nfts_refusal(topology: Namespaces, tmp_path: Path) -> None:
    proc = imds_nat_command(topology, tmp_path, table="counter")  # an nft keyword
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 69
    assert "nft refused the IMDS NAT rules" in err
    assert "syntax error" in err


def test_imds_nat_command_off_in_config(tmp_path: Path) -> None:
    cfg = tmp_path / "off.toml"
    cfg.write_text("[netns]\nimds_nat = false\n")
    proc = subprocess.run(
        [sys.executable, "-m", "guest_agent", "netns", "imds-nat", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0
    assert "off in the configuration" in proc.stderr


# ---------------------------------------------------------------------------------------------
# masquerade_ruleset / load_nft: the nft input and the command's failures


def test_masquerade_ruleset() -> None:
    assert netns.masquerade_ruleset("guest_agent", "10.200.0.5", IMDS) == (
        "table ip guest_agent\n"
        "delete table ip guest_agent\n"
        "table ip guest_agent {\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority 100; policy accept;\n"
        "\t\tip saddr 10.200.0.5 ip daddr 169.254.169.254 masquerade\n"
        "\t}\n"
        "}\n"
    )


@pytest.mark.parametrize(
    ("table", "pod_ip", "imds"),
    [
        ("", "10.0.0.1", IMDS),
        ("1t", "10.0.0.1", IMDS),
        ("t\nflush ruleset", "10.0.0.1", IMDS),
        ("t; flush ruleset", "10.0.0.1", IMDS),
        ("t" * 65, "10.0.0.1", IMDS),
        ("t\u0131", "10.0.0.1", IMDS),
        ("t", "10.0.0.1 ip daddr 0.0.0.0/0", IMDS),
        ("t", "10.0.0.1\nflush ruleset", IMDS),
        ("t", "10.0.0.1/32", IMDS),
        ("t", "010.0.0.1", IMDS),
        ("t", "fd00::1", IMDS),
        ("t", "10.0.0.1", "metadata.example"),
    ],
)
def test_masquerade_ruleset_refuses_what_config_refuses(table: str, pod_ip: str, imds: str) -> None:
    with pytest.raises(ValueError):
        netns.masquerade_ruleset(table, pod_ip, imds)


RULES = netns.masquerade_ruleset("t", "10.0.0.1", IMDS)


def test_load_nft_without_nft(tmp_path: Path) -> None:
    with pytest.raises(NetworkUnavailable) as caught:
        netns.load_nft(RULES, table="t", nft=(str(tmp_path / "nft"),))
    assert caught.value.reason == "the nft command is missing (package nftables)"
    assert caught.value.exit_code == 69


def test_load_nft_bounds_nfts_message() -> None:
    chatty = (sys.executable, "-c", "import sys; sys.stderr.write('\\x1b[31m' + 'y' * 100000); sys.exit(1)")
    with pytest.raises(NetworkUnavailable) as caught:
        netns.load_nft(RULES, table="t", nft=chatty)
    shown = caught.value.supporting_data["nft"]
    assert shown.startswith("\\x1b[31my") and shown.isprintable() and shown.endswith("y...")
    assert len(shown) < netns.NFT_STDERR_SHOWN + 10
    assert caught.value.supporting_data["status"] == 1


def test_load_nft_gets_the_file_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "stdin"
    netns.load_nft(RULES, table="t", nft=("sh", "-c", f'[ "$1 $2" = "-f -" ] && cat > {out}', "nft"))
    assert out.read_text() == RULES


def test_load_nft_that_hangs() -> None:
    with pytest.raises(NetworkUnavailable, match="in time"):
        netns.load_nft(RULES, table="t", nft=(sys.executable, "-c", "import time; time.sleep(60)"), timeout_s=0.5)


def test_iproute_is_for_requests_only() -> None:
    """No multicast group on pyroute2's socket: events would queue behind the answers unread."""
    with netns._iproute() as ipr:
        assert ipr.link_lookup(ifname="lo")
        sockets = set()
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                sockets.add(int(target[8:-1]))
        with open("/proc/self/net/netlink", encoding="ascii") as f:
            rows = [line.split() for line in f][1:]
    rtnl = [row for row in rows if row[1] == "0" and int(row[-1]) in sockets]  # protocol 0: NETLINK_ROUTE
    assert rtnl and all(int(row[3], 16) == 0 for row in rtnl)
