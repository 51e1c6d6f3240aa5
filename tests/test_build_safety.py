"""The image builds cannot harm the machine they run on (image/trees.sh, docs/building.md).

image/build.sh and image/variants/build-variant.sh run here against fake bases and a fake mmdebstrap
(no download, no real build).  Every mount is made inside a private mount namespace the test creates
(`unshare --mount`), so it goes away with that namespace whatever happens; what the scripts leave
mounted is read from inside it, once the script is over."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = REPO / "image" / "build.sh"
VARIANT = REPO / "image" / "variants" / "build-variant.sh"
TREES = REPO / "image" / "trees.sh"
BUDGET = REPO / "image" / "disk-budget.sh"

root_only = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root (mounts in a private mount namespace)"
)
# What image/build.sh checks for before it starts (mmdebstrap is the tests' fake); the image group of
# .ci/apt-deps installs them, a Python-only chroot (make test-pythons) lacks them.
build_tools = pytest.mark.skipif(
    any(shutil.which(t) is None for t in ("mkfs.ext4", "chroot", "gcc")),
    reason="needs image/build.sh's tools (mkfs.ext4, chroot, gcc: .ci/apt-deps image)",
)

# mmdebstrap as far as the build sees it: a tmpfs at DEST/proc in its own mount namespace (where the
# build puts it), with FAKE_LEAK also one in the build script's namespace (what an mmdebstrap that
# mounted in the caller's namespace and failed to unmount would leave), then a wait for a signal.
FAKE_MMDEBSTRAP = r"""#!/bin/bash
[ "$1" = --version ] && { echo "mmdebstrap (fake)"; exit 0; }
dest=${@: -2:1}
echo "$dest" > "$FAKE_DIR/dest"
[ -z "${FAKE_FAIL:-}" ] || exit 3
mkdir -p "$dest/proc" "$dest/leak"
mount -t tmpfs fake-proc "$dest/proc"
[ -z "${FAKE_LEAK:-}" ] || nsenter --mount=/proc/$PPID/ns/mnt mount -t tmpfs fake-leak "$dest/leak"
{ echo "pid $$"; awk '{ print "own", $5 }' /proc/self/mountinfo; awk '{ print "build", $5 }' /proc/$PPID/mountinfo
} > "$FAKE_DIR/ready.tmp"
mv "$FAKE_DIR/ready.tmp" "$FAKE_DIR/ready"
sleep 600 & wait
"""

# Runs "$@" (a build script) in the private mount namespace, its pid in $FAKE_DIR/build.pid; then
# prints its exit status and every mount point under $FAKE_DIR still there.
WRAPPER = r"""
set -u
[ -z "${SETUP:-}" ] || eval "$SETUP"
"$@" & echo $! > "$FAKE_DIR/build.pid"
wait $!; echo "rc=$?"
awk -v d="$FAKE_DIR" 'index($5, d) == 1 { print "left", $5 }' /proc/self/mountinfo
"""


def fake_env(tmp: Path, **extra: str) -> dict[str, str]:
    (tmp / "bin").mkdir(exist_ok=True)
    fake = tmp / "bin" / "mmdebstrap"
    fake.write_text(FAKE_MMDEBSTRAP)
    fake.chmod(0o755)
    (tmp / "sources").write_text("# none: the fake mmdebstrap downloads nothing\n")
    env = dict(os.environ)
    env.update(
        PATH=f"{tmp / 'bin'}:{os.environ['PATH']}",
        FAKE_DIR=str(tmp),
        IMAGE_CACHE=str(tmp / "cache"),
        IMAGE_OUT=str(tmp / "out"),
        VARIANT_CACHE=str(tmp / "vcache"),
        VARIANT_OUT=str(tmp / "vout"),
        SOURCES=str(tmp / "sources"),
        PYTHON=sys.executable,
        TREES_UMOUNT_S="2",
    )
    env.pop("FORCE", None)
    env.update(extra)
    return env


def start(tmp: Path, *cmd: str, setup: str = "", **extra: str) -> subprocess.Popen[str]:
    env = fake_env(tmp, SETUP=setup, **extra)
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", WRAPPER, "wrapper", *cmd],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(p: subprocess.Popen[str]) -> tuple[int, list[str], str]:
    """The build's exit status, what is left mounted in its namespace, its stderr."""
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, (out, err)
    lines = out.splitlines()
    rc = int(next(line for line in lines if line.startswith("rc="))[3:])
    return rc, [line[5:] for line in lines if line.startswith("left ")], err


def wait_for(path: Path, p: subprocess.Popen[str], timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.05)
    return path.read_text()


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def run(tmp: Path, *cmd: str, setup: str = "", **extra: str) -> tuple[int, list[str], str]:
    return finish(start(tmp, *cmd, setup=setup, **extra))


def base_path(tmp: Path) -> Path:
    """The cached base build.sh wants for these inputs: where the fake mmdebstrap is told to build it."""
    rc, left, err = run(tmp, str(BUILD), FAKE_FAIL="1")
    assert rc != 0 and left == [], err
    dest = Path((tmp / "dest").read_text().strip())
    assert dest.name.endswith(".tmp") and not dest.exists()  # the failed build removed its half-built base
    return dest.with_name(dest.name.removesuffix(".tmp"))


def fake_base(base: Path) -> None:
    (base / "proc").mkdir(parents=True)
    (base / "etc").mkdir()
    (base / "etc" / "hostname").write_text("base\n")
    (base / ".complete").touch()


MOUNT_CANARY = 'mount -t tmpfs -o size=1m canary "$CANARY/proc" && echo host-data > "$CANARY/proc/canary"'


@root_only
@build_tools
@pytest.mark.privileged
def test_build_refuses_a_base_with_a_mount_inside(tmp_path: Path) -> None:
    base = base_path(tmp_path)
    fake_base(base)
    rc, left, err = run(tmp_path, str(BUILD), setup=MOUNT_CANARY, CANARY=str(base))
    assert rc == 1, err
    assert f"refusing to use {base}: mount point(s) inside it: {base}/proc" in err
    assert "wheels" not in err  # nothing after the copy ran
    assert not (tmp_path / "out" / "rootfs").exists()
    assert left == [f"{base}/proc"]  # not the build's mount: it leaves it alone


@root_only
@pytest.mark.privileged
def test_variant_build_refuses_a_base_with_a_mount_inside(tmp_path: Path) -> None:
    base = tmp_path / "cache" / "base-0123456789abcdef"
    fake_base(base)
    rc, _, err = run(tmp_path, str(VARIANT), "floor-stock", setup=MOUNT_CANARY, CANARY=str(base))
    assert rc == 1, err
    assert f"refusing to use {base}: mount point(s) inside it: {base}/proc" in err
    assert not (tmp_path / "vout" / "rootfs").exists()


@root_only
@build_tools
@pytest.mark.privileged
@pytest.mark.parametrize("leak", ["", "1"], ids=["mounts-in-mmdebstraps-namespace", "mount-leaked-to-the-build"])
def test_build_interrupted_during_mmdebstrap_leaves_no_mount(tmp_path: Path, leak: str) -> None:
    p = start(tmp_path, str(BUILD), FAKE_LEAK=leak)
    ready = wait_for(tmp_path / "ready", p).splitlines()
    dest = (tmp_path / "dest").read_text().strip()
    assert f"own {dest}/proc" in ready  # mmdebstrap has its mount ...
    assert (f"build {dest}/leak" in ready) == bool(leak)  # ... and, leaked, one in the build's namespace
    assert not any(line.startswith(f"build {dest}/proc") for line in ready)
    fake_pid = int(ready[0].split()[1])

    os.kill(int((tmp_path / "build.pid").read_text()), signal.SIGTERM)
    rc, left, err = finish(p)
    assert rc == 128 + signal.SIGTERM, err
    assert left == [], err
    assert not alive(fake_pid)
    assert not Path(dest).exists()  # the half-built base is gone too


def with_trees(script: str) -> str:
    """A bash script with image/trees.sh sourced (and the die() it expects)."""
    return f'set -euo pipefail; die() {{ echo "die: $*" >&2; exit 1; }}; source "{TREES}"\n{script}'


def in_private_ns(script: str, tmp: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
        env=dict(os.environ, T=str(tmp), TREES_UMOUNT_S="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@root_only
@pytest.mark.privileged
def test_remove_tree_unmounts_before_it_removes(tmp_path: Path) -> None:
    """A bind mount of host data inside a tree: the data survives the removal of the tree, also
    when the mount is busy (then the removal fails instead)."""
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "file").write_text("keep")
    script = """
        mkdir -p "$T/tree/host" "$T/tree2/host"
        mount --bind "$T/precious" "$T/tree/host"
        remove_tree "$T/tree"; [ ! -e "$T/tree" ] && echo removed
        mount --bind "$T/precious" "$T/tree2/host"
        cd "$T/tree2/host"   # busy: this shell's working directory
        (remove_tree "$T/tree2") || echo "refused rc=$?"
    """
    out, err = in_private_ns(with_trees(script), tmp_path).communicate(timeout=120)
    assert out.split("\n")[:2] == ["removed", "refused rc=1"], (out, err)
    assert f"still mounted after 1 s of retries: {tmp_path}/tree2/host" in err
    assert f"cannot remove {tmp_path}/tree2" in err
    assert (precious / "file").read_text() == "keep"


@root_only
@pytest.mark.privileged
def test_guarded_tree_is_unmounted_on_signal_and_removed(tmp_path: Path) -> None:
    """TERM while a run_killable command runs: the command's group is stopped, the guarded tree's
    mount undone and the tree removed (the script failed)."""
    (tmp_path / "inner.sh").write_text(
        with_trees("""
        mkdir -p "$T/tree/proc"; mount -t tmpfs t "$T/tree/proc"
        guard_tree "$T/tree"
        run_killable bash -c 'echo $$ > "$T/child.tmp"; mv "$T/child.tmp" "$T/child"; sleep 600'
    """)
    )
    # Then the script's exit status and the count of mounts left under $T in the namespace.
    wrapper = 'bash "$T/inner.sh" & echo $! > "$T/pid"; wait $!; echo "rc=$?"; grep -c "$T/" /proc/self/mountinfo'
    p = in_private_ns(wrapper, tmp_path)
    child = int(wait_for(tmp_path / "child", p).strip())
    os.kill(int((tmp_path / "pid").read_text()), signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert out.split() == ["rc=143", "0"], (out, err)
    assert not alive(child)
    assert not (tmp_path / "tree").exists()


def test_prune_apt_cache_keeps_the_installed_versions(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    apt.mkdir()
    for name in [
        "libcap2_1%3a2.66-4+deb12u3+b1_amd64.deb",  # epoch: ':' is %3a in the file name
        "libcap2_1%3a2.66-4+deb12u2_amd64.deb",  # an older version
        "bash_5.2.15-2+b13_amd64.deb",
        "gone_1.0_all.deb",  # not installed any more
        "lock",
    ]:
        (apt / name).touch()
    (tmp_path / "packages").write_text("bash 5.2.15-2+b13\nlibcap2 1:2.66-4+deb12u3+b1\n")
    r = subprocess.run(
        ["bash", "-c", with_trees('prune_apt_cache "$1/apt" "$1/packages"'), "x", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0, r
    assert sorted(os.listdir(apt)) == ["bash_5.2.15-2+b13_amd64.deb", "libcap2_1%3a2.66-4+deb12u3+b1_amd64.deb", "lock"]


@root_only
@pytest.mark.privileged
def test_disk_budget_fails_early_when_space_is_short(tmp_path: Path) -> None:
    """A 16 MiB file system for the image trees and the boots' work: every goal that builds is
    refused with the figures; a goal that builds nothing passes."""
    script = f"""
        mount -t tmpfs -o size=16m small "$T" && mkdir "$T/cache"
        for goal in image e2e bench-boot test; do
            IMAGE_CACHE="$T/cache" TMPDIR="$T" {BUDGET} "$goal"; echo "$goal rc=$?"
        done
    """
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
        env=dict(os.environ, T=str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.stdout.split("\n")[:4] == ["image rc=1", "e2e rc=1", "bench-boot rc=1", "test rc=0"], r
    assert "error: not enough disk for make e2e" in r.stderr
    assert "MiB needed, 16 MiB free" in r.stderr
