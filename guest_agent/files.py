"""Writing config files: a whole set switched at once, never through a symlink.

`apply()` replaces the agent's files in a directory (in practice /run/peerpod) as one
set: after a kill -9 at any moment, a reader sees either the complete previous set or
the complete new one.  /run/peerpod is a mount point in the sandboxed unit, so the
directory itself cannot be renamed or exchanged; the switch happens inside it, the way
Kubernetes' AtomicWriter publishes ConfigMap volumes
(kubernetes/kubernetes: pkg/volume/util/atomic_writer.go):

    ..data           -> ..gen-<token>        the one pointer, replaced by a single rename(2)
    ..gen-<token>/   every file of the set, and ..written (the names the agent wrote)
    apf.json         -> ..data/apf.json      one stable symlink per name
    policy.rego      a regular file CAA's tmpfiles `C` line copied, until a plan writes the name

One run, under an flock on the directory:
1. check every target: absent, a regular file (someone else's, such as the tmpfiles
   defaults) or exactly our `..data/<name>` symlink; anything else (a planted symlink,
   a directory, a device) is refused before anything is written;
2. build the new generation: each file created O_EXCL|O_NOFOLLOW, fchmod (and fchown)
   before any byte, written, fsync'd; files the agent did not write that are visible
   through the current generation are hard-linked across (they carry over unless the
   plan replaces them); the ..written list; fsync the generation;
3. prepare the names: a regular file at a planned name is hard-linked into the *current*
   generation and a symlink renamed over it (same inode, same content: invisible); then
   our symlinks at names the new generation lacks (a previous run wrote them, this plan
   does not) are removed, since after the switch they would dangle; fsync;
4. switch: a temp symlink to the new generation renamed over `..data`, fsync (the
   commit point);
5. link the names this plan adds (absent until now: a temp symlink renamed over each, which
   also replaces a tmpfiles default copied there meanwhile), fsync;
6. clean up: older generations, temp links.
So no symlink of ours ever dangles.  A dangling one would read "no such file" like an
absent name, but systemd-tmpfiles' `C` lines (CAA's defaults for auth.json and policy.rego)
take any entry as the file and would not copy their default after a kill.  The price is
in the steps around the switch: a name the new set drops reads "no such file" just before
it, a name it adds just after it, as they do in the set they belong to; no name ever shows
old content while another shows new.
A failure before step 4 removes the new generation and restores the names removed in 3;
leftovers of a killed run (older generations, temp links, a dangling symlink of an older
version) are removed by the next run before anything else, and temp names carry a random
token, so they never collide with a later run.

Consumers follow the symlinks: kata-agent (/etc/kata-opa/default-policy.rego ->
/run/peerpod/policy.rego, a chain of three), attestation-agent `-c /run/peerpod/aa.toml`,
CDH's `[ -f ... ]`, APF's apf.json, systemd's PathExists=/ConditionPathExists= (access(2)).
A `.path` unit watching /run/peerpod/<name> sees the IN_MOVED_TO of the name's link (step 5)
in that directory and re-checks (systemd/systemd: src/core/path.c watches the parent with
IN_CREATE|IN_MOVED_TO and re-runs access() on any event there).

Several directories (only if `files.allowed_paths` is extended beyond /run/peerpod) are
each switched atomically, one after another: the set is atomic per directory.
`write_atomic` writes one file (temp file, rename) for the agent's own state.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from guest_agent.entropy import random_bytes
from guest_agent.errors import WriteFailed
from guest_agent.log import logger

Step = Callable[[str], None]

log = logger("guest_agent.files")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DATA = "..data"
GEN_PREFIX = "..gen-"
TMP_PREFIX = "..tmp-"
WRITTEN = "..written"  # inside a generation: the names the agent wrote, one per line
_WRITTEN_MAX = 64 * 1024


@dataclass(frozen=True, slots=True)
class FileSpec:
    """One file to write."""

    path: str  # absolute, normalised guest path
    content: bytes = field(repr=False)  # TLS keys, registry credentials: never in a repr
    mode: int = 0o600
    uid: int | None = None  # None: leave as created (the agent's own user)
    gid: int | None = None
    source: str = "user-data"  # user-data | initdata | agent: for logs and `check`


def _open_dir(parent_fd: int, name: str, *, create: bool, dir_mode: int, path: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        if not create:
            raise
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        os.fchmod(fd, dir_mode)  # explicit: the umask must not decide who can traverse /run/peerpod
        return fd
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise WriteFailed("refusing to write through a symlink or non-directory", path=path) from exc
        raise


def open_parent(root_fd: int, path: str, *, create: bool, dir_mode: int = 0o755) -> int:
    """Open the directory that holds `path` (relative to root_fd) without following symlinks."""
    parts = [p for p in path.split("/") if p]
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            nfd = _open_dir(fd, part, create=create, dir_mode=dir_mode, path=path)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def _token() -> str:
    return random_bytes(6).hex()


def _link_target(name: str) -> str:
    return f"{DATA}/{name}"


def _lstat(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _is_our_link(dir_fd: int, name: str, st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=dir_fd) == _link_target(name)


def check_target(dir_fd: int, name: str, path: str) -> None:
    """A target may be absent, a regular file or our own `..data/<name>` symlink; nothing else."""
    st = _lstat(dir_fd, name)
    if st is None or stat.S_ISREG(st.st_mode) or _is_our_link(dir_fd, name, st):
        return
    if stat.S_ISLNK(st.st_mode):
        raise WriteFailed("refusing to replace a symlink planted at a target", path=path)
    raise WriteFailed("target exists and is not a regular file", path=path)


def _write_new(dir_fd: int, name: str, content: bytes, mode: int, uid: int | None, gid: int | None) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)  # before any byte: no window with a wider mode (umask-proof)
        if uid is not None or gid is not None:
            os.fchown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(dir_fd: int, name: str) -> None:
    """Remove a generation (a directory of files) or a leftover link; never follows a symlink."""
    st = _lstat(dir_fd, name)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        for entry in os.listdir(fd):
            os.unlink(entry, dir_fd=fd)  # a generation holds files only: a directory here fails, loudly
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


def _read_written(gen_fd: int) -> set[str] | None:
    try:
        fd = os.open(WRITTEN, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=gen_fd)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, _WRITTEN_MAX)
    finally:
        os.close(fd)
    return set(data.decode("utf-8", "replace").split("\n")) - {""}


class _SetDir:
    """One directory's share of the set, through the steps of the module docstring."""

    __slots__ = ("added", "cfd", "current", "fd", "live", "new", "path", "removed", "specs", "step", "tok")

    def __init__(self, path: str, fd: int, specs: dict[str, FileSpec], step: Step) -> None:
        self.path = path  # guest path of the directory, for errors
        self.fd = fd
        self.specs = specs  # name -> spec
        self.step = step
        self.current: str | None = None  # the generation `..data` points at
        self.new: str | None = None
        self.cfd = -1  # the current generation, open from build() to close()
        self.tok = _token()
        self.live: set[str] = set()  # the names of the new generation (planned and carried)
        self.added: list[str] = []  # planned names with no entry yet: linked after the switch
        self.removed: list[str] = []  # our links the new generation lacks: removed before it

    def check(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)  # one writer: the sweep below must not eat a live generation
        st = _lstat(self.fd, DATA)
        if st is not None:
            target = os.readlink(DATA, dir_fd=self.fd) if stat.S_ISLNK(st.st_mode) else ""
            gst = _lstat(self.fd, target) if target.startswith(GEN_PREFIX) and "/" not in target else None
            if gst is None or not stat.S_ISDIR(gst.st_mode):
                raise WriteFailed("the generation pointer is not ours", path=f"{self.path}/{DATA}")
            self.current = target
        for name, spec in self.specs.items():
            if name.startswith(".."):
                raise WriteFailed("names starting with '..' are reserved for the agent's generations", path=spec.path)
            check_target(self.fd, name, spec.path)

    def sweep(self) -> None:
        """Leftovers of a killed run: generations nothing points at, temp links, our links that
        dangle (an older version's window; to tmpfiles they are files)."""
        for entry in os.listdir(self.fd):
            try:
                if entry.startswith(".."):
                    if entry != self.current and entry.startswith((GEN_PREFIX, TMP_PREFIX)):
                        _remove_tree(self.fd, entry)
                elif _is_our_link(self.fd, entry, _lstat(self.fd, entry)) and (
                    self.current is None or _lstat(self.fd, f"{self.current}/{entry}") is None
                ):
                    os.unlink(entry, dir_fd=self.fd)
            except OSError as exc:  # invisible debris must not fail a run
                log.warning("cannot remove %s/%s: %s", self.path, entry, exc)
        self.step("swept")

    def build(self, dir_mode: int) -> None:
        self.new = f"{GEN_PREFIX}{self.tok}"
        os.mkdir(self.new, 0o700, dir_fd=self.fd)
        gfd = os.open(self.new, _DIR_FLAGS, dir_fd=self.fd)
        try:
            os.fchmod(gfd, dir_mode)
            for name, spec in self.specs.items():
                _write_new(gfd, name, spec.content, spec.mode, spec.uid, spec.gid)
                self.step(f"wrote {name}")
            self.live = set(self.specs)
            for name in self._carried():
                os.link(name, name, src_dir_fd=self.cfd, dst_dir_fd=gfd, follow_symlinks=False)
                self.live.add(name)
                self.step(f"carried {name}")
            _write_new(gfd, WRITTEN, "".join(f"{n}\n" for n in self.specs).encode(), 0o600, None, None)
            os.fsync(gfd)
        finally:
            os.close(gfd)
        self.step("built")

    def _carried(self) -> list[str]:
        """Files the agent did not write, visible now through the current generation."""
        if self.cfd < 0:
            return []
        written = _read_written(self.cfd)
        if written is None:
            return []  # not a list we wrote: carry nothing rather than resurrect
        out = []
        for entry in sorted(os.listdir(self.cfd)):
            if entry in self.specs or entry in written or entry.startswith(".."):
                continue
            est = _lstat(self.cfd, entry)
            if est is not None and stat.S_ISREG(est.st_mode) and _is_our_link(self.fd, entry, _lstat(self.fd, entry)):
                out.append(entry)
        return out

    def open_current(self, dir_mode: int, *, create: bool) -> None:
        if self.cfd >= 0 or (self.current is None and not create):
            return
        if self.current is None:
            # First run in this directory: an empty generation (nothing written by the
            # agent) that the regular files below can move into.
            first = f"{GEN_PREFIX}{_token()}"
            os.mkdir(first, dir_mode, dir_fd=self.fd)
            fd = os.open(first, _DIR_FLAGS, dir_fd=self.fd)
            try:
                os.fchmod(fd, dir_mode)
                _write_new(fd, WRITTEN, b"", 0o600, None, None)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.symlink(first, DATA, dir_fd=self.fd)  # `..data` was absent: nothing reads it yet
            self.current = first
            self.step("first generation")
        self.cfd = os.open(self.current, _DIR_FLAGS, dir_fd=self.fd)

    def _link(self, name: str) -> None:
        """<name> -> ..data/<name>, renamed over whatever entry is there (one rename: no gap)."""
        tmp = f"{TMP_PREFIX}{self.tok}-{name}"
        os.symlink(_link_target(name), tmp, dir_fd=self.fd)
        os.rename(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def prepare(self) -> None:
        """Every planned name that exists becomes our symlink without changing what it shows;
        our links the new generation lacks go (they read "no such file" from now on)."""
        for name in self.specs:
            st = _lstat(self.fd, name)
            if st is None:
                self.added.append(name)
            elif not _is_our_link(self.fd, name, st):  # a regular file (check() refused the rest)
                if _lstat(self.cfd, name) is not None:
                    # Only reachable through `..data/<name>`, which <name> does not point at yet.
                    os.unlink(name, dir_fd=self.cfd)
                os.link(name, name, src_dir_fd=self.fd, dst_dir_fd=self.cfd, follow_symlinks=False)
                self._link(name)  # same inode behind a link
                self.step(f"prepared {name}")
        for entry in sorted(os.listdir(self.fd)):
            if (
                entry not in self.live
                and not entry.startswith("..")
                and _is_our_link(self.fd, entry, _lstat(self.fd, entry))
            ):
                os.unlink(entry, dir_fd=self.fd)
                self.removed.append(entry)
                self.step(f"withdrew {entry}")
        os.fsync(self.fd)

    def switch(self) -> None:
        assert self.new is not None
        tmp = f"{TMP_PREFIX}{self.tok}-data"
        os.symlink(self.new, tmp, dir_fd=self.fd)
        try:
            self.step("switch staged")
            os.rename(tmp, DATA, src_dir_fd=self.fd, dst_dir_fd=self.fd)  # the commit point
        except BaseException:
            os.unlink(tmp, dir_fd=self.fd)
            raise
        os.fsync(self.fd)
        self.step("switched")

    def publish(self) -> None:
        """The names this plan adds, now that `..data` holds them."""
        for name in self.added:
            self._link(name)
            self.step(f"linked {name}")
        os.fsync(self.fd)

    def cleanup(self) -> None:
        """After the switch: what is left is invisible, so failures here are only logged."""
        try:
            for entry in os.listdir(self.fd):
                if entry not in (DATA, self.new) and entry.startswith((GEN_PREFIX, TMP_PREFIX)):
                    _remove_tree(self.fd, entry)
                    self.step(f"removed {entry}")
        except OSError as exc:
            log.warning("cannot remove an old generation in %s: %s (the next run retries)", self.path, exc)

    def abort(self) -> None:
        """Before the switch: the new generation goes, the names removed for it come back."""
        try:
            for name in self.removed:
                if _lstat(self.fd, name) is None:  # else a tmpfiles default arrived: it stays
                    self._link(name)
            if self.new is not None:
                _remove_tree(self.fd, self.new)
        except OSError as exc:
            log.warning("cannot undo an unfinished set in %s: %s", self.path, exc)

    def close(self) -> None:
        if self.cfd >= 0:
            os.close(self.cfd)
            self.cfd = -1
        os.close(self.fd)  # releases the flock


def _no_step(_: str) -> None:
    pass


def _open_root(root: str) -> int:
    try:
        os.makedirs(root, exist_ok=True)  # --root names a scratch dir that may not exist yet
        return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise WriteFailed("cannot open the root directory", root=root, error=exc.strerror) from exc


def apply(specs: list[FileSpec], *, root: str, dir_mode: int = 0o755, step: Step | None = None) -> None:
    """Write every spec as one set, or nothing (see the module docstring).

    `step` is a test hook called between the steps (the kill-loop tests pause there)."""
    step = step or _no_step
    groups: dict[str, dict[str, FileSpec]] = {}
    for spec in specs:
        d, _, name = spec.path.rpartition("/")
        groups.setdefault(d, {})[name] = spec
    root_fd = _open_root(root)
    dirs: list[_SetDir] = []
    what = specs[0].path if specs else root
    try:
        try:
            for d, named in groups.items():
                what = d
                fd = open_parent(root_fd, f"{d}/.", create=True, dir_mode=dir_mode)
                dirs.append(_SetDir(d or "/", fd, named, step))
                dirs[-1].check()
            for sd in dirs:
                what = sd.path
                sd.sweep()
                sd.open_current(dir_mode, create=False)
                sd.build(dir_mode)
            for sd in dirs:
                what = sd.path
                sd.open_current(dir_mode, create=True)
                sd.prepare()
        except BaseException as exc:
            for sd in dirs:
                sd.abort()
            if isinstance(exc, OSError):
                raise WriteFailed("cannot write a config file", path=what, error=exc.strerror) from exc
            raise
        for sd in dirs:
            try:
                sd.switch()
            except OSError as exc:
                sd.abort()
                raise WriteFailed("cannot switch to the new set of files", path=sd.path, error=exc.strerror) from exc
            try:
                sd.publish()
            except OSError as exc:  # the new set is live, less the names it adds: the next run links them
                raise WriteFailed("cannot link a new file", path=sd.path, error=exc.strerror) from exc
            sd.cleanup()
    finally:
        for sd in dirs:
            sd.close()
        os.close(root_fd)


def write_atomic(path: str, content: bytes, *, root: str = "/", mode: int = 0o600) -> None:
    """One file of the agent's own state: temp file (random name), fsync, rename, fsync the directory.

    Never through a symlink; a temp file left by a killed run is removed by the next write."""
    root_fd = _open_root(root)
    try:
        dfd = open_parent(root_fd, path, create=True)
    except OSError as exc:
        os.close(root_fd)
        raise WriteFailed("cannot write a state file", path=path, error=exc.strerror) from exc
    os.close(root_fd)
    name = path.rsplit("/", 1)[1]
    prefix = f".{name}.guest-agent-"
    tmp = f"{prefix}{_token()}.tmp"
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        st = _lstat(dfd, name)
        if st is not None and stat.S_ISLNK(st.st_mode):
            raise WriteFailed("refusing to replace a symlink planted at a target", path=path)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise WriteFailed("target exists and is not a regular file", path=path)
        for entry in os.listdir(dfd):
            if entry.startswith(prefix) and entry.endswith(".tmp"):
                os.unlink(entry, dir_fd=dfd)
        _write_new(dfd, tmp, content, mode, None, None)
        os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
        os.fsync(dfd)
    except OSError as exc:
        try:
            os.unlink(tmp, dir_fd=dfd)
        except OSError:
            pass
        raise WriteFailed("cannot write a state file", path=path, error=exc.strerror) from exc
    finally:
        os.close(dfd)
