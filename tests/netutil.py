"""Throwaway network namespaces for tests.

Every namespace lives under a temporary run directory the test owns; the
host's own namespace is only ever read (to check that nothing leaked into it).
`ip` and `nft` run inside a namespace through `nsenter --net=<file>`, so they
never see the host's links, routes or rules.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from guest_agent.podnet import netns

MNT_DETACH = 0x2


def require_netns() -> None:
    """Skip unless we may create network namespaces (root with CAP_SYS_ADMIN + CAP_NET_ADMIN)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    for tool in ("ip", "nsenter"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs the {tool!r} command")


class Namespaces:
    """Named namespaces in a private run dir; `remove_all` undoes everything."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = str(run_dir)
        self.names: list[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.run_dir, name)

    def add(self, name: str) -> str:
        netns.ensure_netns(name, run_dir=self.run_dir)
        if name not in self.names:
            self.names.append(name)
        return self.path(name)

    def sh(self, name: str, script: str) -> str:
        """Run a shell script with `ip`/`nft` inside namespace `name`; return stdout."""
        done = subprocess.run(
            ["nsenter", f"--net={self.path(name)}", "sh", "-ec", script],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise AssertionError(f"in netns {name}: {script!r} failed: {done.stderr.strip()}")
        return done.stdout

    def add_stub_link(self, name: str, ifname: str) -> None:
        """A link to hang addresses on: `dummy`, or an empty bridge where dummy is not built."""
        try:
            self.sh(name, f"ip link add {ifname} type dummy")
        except AssertionError:
            self.sh(name, f"ip link add {ifname} type bridge")
        self.sh(name, f"ip link set {ifname} up")

    def remove_all(self) -> None:
        for name in self.names:
            netns.remove_netns(name, run_dir=self.run_dir)
        # ensure_netns bind-mounted the run dir onto itself (to make it MS_SHARED): undo it.
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        while _is_mount_point(self.run_dir):
            if libc.umount2(self.run_dir.encode(), MNT_DETACH) != 0:
                err = ctypes.get_errno()
                if err in (errno.EINVAL, errno.ENOENT):
                    break
                raise OSError(err, os.strerror(err), self.run_dir)


def mountinfo() -> list[list[str]]:
    """This process's mounts, one list of /proc/self/mountinfo fields each (field 4: the mount point)."""
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [line.split() for line in f]


def _is_mount_point(path: str) -> bool:
    real = os.path.realpath(path)
    return any(fields[4] == real for fields in mountinfo())


@contextmanager
def namespaces(tmp_path: Path) -> Iterator[Namespaces]:
    require_netns()
    ns = Namespaces(tmp_path / "netns")
    try:
        try:
            ns.add("probe")
        except OSError as exc:
            pytest.skip(f"cannot create network namespaces here: {exc}")
        netns.remove_netns("probe", run_dir=ns.run_dir)
        ns.names.remove("probe")
        yield ns
    finally:
        ns.remove_all()


def host_snapshot() -> tuple[set[str], set[str]]:
    """The host namespace's link names and nft tables, read only, to prove nothing leaked into it."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in links.splitlines()}
    tables: set[str] = set()
    if shutil.which("nft"):
        out = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        tables = {line.strip() for line in out.splitlines() if line.strip()}
    return names, tables
