"""Set-atomic writes that never follow a symlink, checked down to a kill -9 at every step."""

from __future__ import annotations

import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent import files
from guest_agent.errors import WriteFailed
from guest_agent.files import FileSpec
from tests.conftest import snapshot
from tests.fileset import (
    PLANS,
    State,
    after_kill,
    dangling,
    defaults_state,
    lay_defaults,
    lay_tmpfiles,
    leftovers,
    run_tmpfiles,
    visible,
)


def specs() -> list[FileSpec]:
    return [
        FileSpec("/run/peerpod/apf.json", b"{}\n", 0o600),
        FileSpec("/run/peerpod/initdata.digest", b"ab" * 32, 0o644),
    ]


def peerpod(root: Path) -> Path:
    return root / "run/peerpod"


def test_writes_with_modes_and_creates_dirs(tmp_path: Path) -> None:
    old = os.umask(0o077)  # the mode must not depend on the umask
    try:
        files.apply(specs(), root=str(tmp_path))
    finally:
        os.umask(old)
    d = peerpod(tmp_path)
    assert (d / "apf.json").read_bytes() == b"{}\n"
    assert (d / "apf.json").stat().st_mode & 0o7777 == 0o600
    assert (d / "initdata.digest").stat().st_mode & 0o7777 == 0o644
    assert d.stat().st_mode & 0o7777 == 0o755
    names = sorted(os.listdir(d))
    assert names[:3] == ["..data", names[1], "apf.json"] and names[1].startswith("..gen-")
    assert names[3:] == ["initdata.digest"]  # one generation, no temp files left
    assert os.readlink(d / "apf.json") == "..data/apf.json"
    assert os.readlink(d / "..data") == names[1]
    assert (d / names[1]).stat().st_mode & 0o7777 == 0o755
    assert leftovers(d) == []


def test_replacing_a_set_switches_every_file(tmp_path: Path) -> None:
    files.apply(PLANS["old"], root=str(tmp_path))
    files.apply(PLANS["new"], root=str(tmp_path))
    assert visible(peerpod(tmp_path)) == State({}, frozenset()).apply(PLANS["new"]).visible
    assert not (peerpod(tmp_path) / "policy.rego").is_symlink()  # written by the old run only: gone
    assert leftovers(peerpod(tmp_path)) == []


def test_tmpfiles_defaults_carry_over_until_a_plan_replaces_them(tmp_path: Path) -> None:
    """CAA's tmpfiles `C` lines put auth.json and policy.rego there before the agent runs."""
    d = peerpod(tmp_path)
    lay_defaults(tmp_path)
    inode = (d / "auth.json").stat().st_ino
    state = defaults_state()
    for plan in ("new", "old", "new"):
        files.apply(PLANS[plan], root=str(tmp_path))
        state = state.apply(PLANS[plan])
        assert visible(d) == state.visible, plan
        assert leftovers(d) == []
        if plan == "new" and "policy.rego" in state.visible:  # the first run: the default is carried
            assert (d / "policy.rego").read_bytes() == b"package agent_policy\ndefault allow\n"
    # the second run ("old") replaced policy.rego, so the third has none; auth.json is the plan's
    assert "policy.rego" not in visible(d) and (d / "auth.json").stat().st_ino != inode


def test_a_replaced_default_moves_into_the_old_generation_first(tmp_path: Path) -> None:
    """The conversion is invisible: the same inode, now behind our symlink."""
    d = peerpod(tmp_path)
    lay_defaults(tmp_path)
    inode = (d / "policy.rego").stat().st_ino
    seen: list[int] = []

    def step(name: str) -> None:
        if name == "prepared policy.rego":
            seen.append((d / "policy.rego").stat().st_ino)
            assert (d / "policy.rego").is_symlink()

    files.apply(PLANS["old"], root=str(tmp_path), step=step)
    assert seen == [inode]
    assert (d / "policy.rego").read_bytes() == b"package agent_policy\n# old\n"


def test_a_default_the_plan_does_not_name_stays_a_plain_file(tmp_path: Path) -> None:
    lay_defaults(tmp_path)
    files.apply(PLANS["old"], root=str(tmp_path))
    auth = peerpod(tmp_path) / "auth.json"
    assert not auth.is_symlink() and auth.read_bytes() == b'{"auths":{}}\n'


def test_symlink_at_target_is_refused_and_nothing_written(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    d = peerpod(tmp_path)
    d.mkdir(parents=True)
    (d / "initdata.digest").symlink_to(victim)
    before = snapshot(tmp_path)
    with pytest.raises(WriteFailed, match="symlink"):
        files.apply(specs(), root=str(tmp_path))
    assert snapshot(tmp_path) == before  # apf.json (staged first) was rolled back too
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize("target", ["..data/apf.json", "../../victim", "..data/../../victim"])
def test_a_link_that_is_not_exactly_ours_is_refused(tmp_path: Path, target: str) -> None:
    files.apply(specs(), root=str(tmp_path))
    d = peerpod(tmp_path)
    (d / "initdata.digest").unlink()
    (d / "initdata.digest").symlink_to(target)  # points elsewhere than ..data/initdata.digest
    before = snapshot(tmp_path)
    with pytest.raises(WriteFailed, match="symlink planted"):
        files.apply(specs(), root=str(tmp_path))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("pointer", ["/etc", "..gen-nothere", "apf.json", None])
def test_a_generation_pointer_that_is_not_ours_is_refused(tmp_path: Path, pointer: str | None) -> None:
    d = peerpod(tmp_path)
    d.mkdir(parents=True)
    if pointer is None:
        (d / "..data").mkdir()  # a directory, not a symlink
    else:
        (d / "..data").symlink_to(pointer)
    before = snapshot(tmp_path)
    with pytest.raises(WriteFailed, match="generation pointer"):
        files.apply(specs(), root=str(tmp_path))
    assert snapshot(tmp_path) == before


def test_reserved_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(WriteFailed, match="reserved"):
        files.apply([FileSpec("/run/peerpod/..data", b"x")], root=str(tmp_path))


def test_symlink_in_a_parent_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run").mkdir()
    (tmp_path / "run/peerpod").symlink_to(elsewhere)
    before = snapshot(tmp_path)
    with pytest.raises(WriteFailed, match="symlink"):
        files.apply(specs(), root=str(tmp_path))
    assert snapshot(tmp_path) == before
    assert os.listdir(elsewhere) == []


def test_directory_at_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run/peerpod/initdata.digest").mkdir(parents=True)
    with pytest.raises(WriteFailed, match="not a regular file"):
        files.apply(specs(), root=str(tmp_path))
    assert not (tmp_path / "run/peerpod/apf.json").exists()


def test_io_error_midway_leaves_nothing(tmp_path: Path) -> None:
    """A directory that cannot be opened fails the run before anything is visible or staged."""
    (tmp_path / "run/peerpod").mkdir(parents=True)
    (tmp_path / "run/other").write_bytes(b"a file where a directory is needed")
    bad = [*specs(), FileSpec("/run/other/x", b"x")]
    before = snapshot(tmp_path)
    with pytest.raises(WriteFailed):
        files.apply(bad, root=str(tmp_path))
    assert snapshot(tmp_path) == before


class Fault:
    """A step hook raising an I/O error at one step (an injected ENOSPC)."""

    def __init__(self, at: str) -> None:
        self.at = at

    def __call__(self, name: str) -> None:
        if name == self.at:
            raise OSError(28, "No space left on device")


@pytest.mark.parametrize(
    "at", ["wrote apf.json", "built", "prepared auth.json", "withdrew policy.rego", "switch staged"]
)
def test_an_error_before_the_switch_keeps_the_old_set_and_leaves_no_temp_file(tmp_path: Path, at: str) -> None:
    """Even the name the new set drops, removed just before the switch, comes back."""
    d = peerpod(tmp_path)
    lay_defaults(tmp_path)
    files.apply(PLANS["old"], root=str(tmp_path))
    old = defaults_state().apply(PLANS["old"])
    with pytest.raises(WriteFailed) as ei:
        files.apply(PLANS["new"], root=str(tmp_path), step=Fault(at))
    assert ei.value.exit_code == 73 and ei.value.supporting_data["error"] == "No space left on device"
    assert visible(d) == old.visible
    gens = [n for n in os.listdir(d) if n.startswith("..gen-")]
    assert gens == [os.readlink(d / "..data")]  # the new generation was removed
    assert [n for n in os.listdir(d) if n.startswith("..tmp-")] == []
    files.apply(PLANS["new"], root=str(tmp_path))  # and the next run cleans whatever is left
    assert visible(d) == old.apply(PLANS["new"]).visible
    assert leftovers(d) == []


@pytest.mark.privileged
def test_an_owner_the_agent_may_not_give_leaves_no_temp_file(scratch: Path) -> None:
    """fchown refused (EPERM) for an unprivileged writer: the run fails whole and cleanly."""
    if os.geteuid() != 0 or not str(scratch).startswith("/dev/shm/"):
        pytest.skip("needs root to drop to another user, and a directory that user can reach")
    scratch.chmod(0o755)
    root = scratch / "root"
    lay_defaults(root)
    files.apply(PLANS["old"], root=str(root))
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [dirpath, *(os.path.join(dirpath, f) for f in dirnames + filenames)]:
            os.chown(n, 65534, 65534, follow_symlinks=False)
    before = snapshot(root)
    plan = [*PLANS["new"][:2], FileSpec("/run/peerpod/initdata", b"x", 0o600, uid=0), *PLANS["new"][3:]]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                files.apply(plan, root=str(root))
                os.write(w, b"applied")
            except WriteFailed as exc:
                os.write(w, exc.describe().encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    said = os.read(r, 4096).decode()
    os.close(r)
    assert said.startswith("cannot write a config file") and "Operation not permitted" in said, said
    assert snapshot(root) == before  # the old set, and no generation or temp file from the failed run


def test_leftovers_of_a_killed_run_never_fail_a_later_run(tmp_path: Path) -> None:
    d = peerpod(tmp_path)
    files.apply(specs(), root=str(tmp_path))
    (d / "..gen-deadbeef0000").mkdir()
    (d / "..gen-deadbeef0000/apf.json").write_bytes(b"half")
    (d / "..tmp-deadbeef0000-data").symlink_to("..gen-deadbeef0000")
    (d / "cdh.toml").symlink_to("..data/cdh.toml")  # a dangling link of ours
    files.apply(specs(), root=str(tmp_path))
    assert leftovers(d) == []
    assert visible(d) == {"apf.json": (0o600, b"{}\n"), "initdata.digest": (0o644, b"ab" * 32)}


def test_write_atomic_single_file(tmp_path: Path) -> None:
    state = tmp_path / "run/guest-agent"
    state.mkdir(parents=True)
    (state / ".timeline.json.guest-agent-1234-0.tmp").write_bytes(b"left by a killed run")
    (state / ".timeline.json.guest-agent-0123456789ab.tmp").write_bytes(b"left by a killed run")
    files.write_atomic("/run/guest-agent/timeline.json", b"{}", root=str(tmp_path), mode=0o644)
    assert (state / "timeline.json").read_bytes() == b"{}"
    assert (state / "timeline.json").stat().st_mode & 0o7777 == 0o644
    assert os.listdir(state) == ["timeline.json"]


def test_write_atomic_refuses_a_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "run/guest-agent").mkdir(parents=True)
    (tmp_path / "run/guest-agent/timeline.json").symlink_to(victim)
    with pytest.raises(WriteFailed, match="symlink"):
        files.write_atomic("/run/guest-agent/timeline.json", b"{}", root=str(tmp_path))
    assert victim.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path / "run/guest-agent")) == ["timeline.json"]


# -- kill -9 at every step and at random moments


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs directory when there is one (like /run), else tmp_path."""
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else str(tmp_path)
    d = Path(tempfile.mkdtemp(prefix="guest-agent-kill-", dir=base))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def fork_apply(root: Path, plan: str, pause: int) -> tuple[int, int]:
    """A child process applying `plan`; with pause >= 0 it stops at that step until killed."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(r)
            count = 0

            def step(name: str) -> None:
                nonlocal count
                if count == pause:
                    os.write(w, f"paused {name}\n".encode())
                    time.sleep(3600)
                count += 1

            os.write(w, b"go\n")
            t0 = time.perf_counter()
            files.apply(PLANS[plan], root=str(root), step=step)
            os.write(w, f"done {count} {time.perf_counter() - t0:.6f}\n".encode())
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def read_line(fd: int) -> str:
    out = b""
    while not out.endswith(b"\n"):
        byte = os.read(fd, 1)  # one at a time: the next line stays in the pipe
        if not byte:
            break
        out += byte
    return out.decode().strip()


def kill(pid: int, fd: int) -> str:
    """SIGKILL the child; what it reported after "go" before dying ("" if nothing)."""
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    said = read_line(fd)
    os.close(fd)
    return said


SCENARIOS = {
    # the first run in a boot: only the tmpfiles defaults are there
    "over-defaults": ("new", None, True),
    # a rerun over the set of a previous run (which replaced policy.rego; the new one drops it)
    "over-a-set": ("new", "old", True),
    # the agent starts in parallel with systemd-tmpfiles-setup (units/guest-agent.service): the
    # first run before the defaults (the new set adds auth.json, which has a `C` line) ...
    "before-tmpfiles": ("new", None, False),
    # ... and a rerun over a set written before them
    "over-a-set-before-tmpfiles": ("new", "old", False),
}


def fresh(scratch: Path, n: int, pre: str | None, defaults: bool) -> tuple[Path, State]:
    root = scratch / str(n)
    lay_tmpfiles(root)
    state = State({}, frozenset())
    if defaults:
        lay_defaults(root)
        state = defaults_state()
    if pre is not None:
        files.apply(PLANS[pre], root=str(root))
        state = state.apply(PLANS[pre])
    return root, state


def check_after_kill(root: Path, before: State, after: State, next_plan: str) -> str:
    """What a killed run leaves: the old or the new set (a name either drops or adds may be
    missing, never a mix), and no dangling link, so systemd-tmpfiles, run now, copies a default
    wherever nothing is; then the next run succeeds and leaves no debris."""
    d = peerpod(root)
    side, state = after_kill(before, after, visible(d))
    links = dangling(d)
    run_tmpfiles(root)
    state = state.with_defaults()
    assert visible(d) == state.visible, f"tmpfiles found dangling links of the killed run: {links}"
    assert links == []
    files.apply(PLANS[next_plan], root=str(root))
    assert visible(d) == state.apply(PLANS[next_plan]).visible
    assert leftovers(d) == []
    shutil.rmtree(root)
    return side


needs_tmpfiles = pytest.mark.skipif(shutil.which("systemd-tmpfiles") is None, reason="needs systemd-tmpfiles")


@needs_tmpfiles
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_kill_at_every_step(scratch: Path, scenario: str) -> None:
    plan, pre, defaults = SCENARIOS[scenario]
    root, before = fresh(scratch, 0, pre, defaults)
    after = before.apply(PLANS[plan])
    pid, fd = fork_apply(root, plan, -1)
    assert read_line(fd) == "go"
    said = read_line(fd)
    os.waitpid(pid, 0)
    os.close(fd)
    steps = int(said.split()[1])
    assert visible(peerpod(root)) == after.visible
    shutil.rmtree(root)
    outcomes: dict[str, int] = {"old": 0, "new": 0}
    for i in range(steps):
        root, _ = fresh(scratch, i + 1, pre, defaults)
        pid, fd = fork_apply(root, plan, i)
        assert read_line(fd) == "go"
        assert read_line(fd).startswith("paused ")
        kill(pid, fd)
        outcomes[check_after_kill(root, before, after, ("old", "new")[i % 2])] += 1
    print(f"{scenario}: {steps} steps, killed at each: {outcomes}")
    assert outcomes["old"] and outcomes["new"]  # both sides of the switch were hit


KILLS = int(os.environ.get("GUEST_AGENT_KILLS", "40"))


@needs_tmpfiles
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_kill_at_random_moments(scratch: Path, scenario: str) -> None:
    plan, pre, defaults = SCENARIOS[scenario]
    seed = int(os.environ.get("GUEST_AGENT_KILL_SEED", time.time_ns()))
    rng = random.Random(seed)
    root, before = fresh(scratch, 0, pre, defaults)
    after = before.apply(PLANS[plan])
    shutil.rmtree(root)
    spans = []
    for i in range(3):  # how long apply() takes in the child: the window the kills are spread over
        root, _ = fresh(scratch, i, pre, defaults)
        pid, fd = fork_apply(root, plan, -1)
        read_line(fd)
        spans.append(float(read_line(fd).split()[2]))
        os.waitpid(pid, 0)
        os.close(fd)
        shutil.rmtree(root)
    span = sorted(spans)[1]
    outcomes: dict[str, int] = {"old": 0, "new": 0, "finished": 0}
    for i in range(KILLS):
        root, _ = fresh(scratch, i + 3, pre, defaults)
        pid, fd = fork_apply(root, plan, -1)
        read_line(fd)  # "go": apply() starts now
        time.sleep(rng.uniform(0, span))
        finished = kill(pid, fd).startswith("done")
        outcome = check_after_kill(root, before, after, rng.choice(("old", "new")))
        outcomes["finished" if finished else outcome] += 1
    print(f"{scenario}: {KILLS} kills over {span * 1e3:.2f} ms (seed {seed}): {outcomes}")
