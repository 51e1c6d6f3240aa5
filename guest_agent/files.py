"""Writing config files: all-or-nothing, atomic per file, never through a symlink.

`apply()` is a two-phase commit.  Phase one opens every parent directory component by
component with O_NOFOLLOW (relative to the --root directory fd), refuses a symlink or a
non-regular file at any target, and writes each file's content to a temp file in its
target directory (mode set with fchmod before any byte is written, then fsync).  Only
when every temp file is complete does phase two rename them over their targets and
fsync the directories.  A failure in phase one removes the temp files: the root is
left exactly as it was.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from guest_agent.errors import WriteFailed

log = logging.getLogger("guest_agent.files")

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class FileSpec:
    path: str  # absolute, normalised guest path
    content: bytes
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


def check_target(dir_fd: int, name: str, path: str) -> None:
    """A target may be absent or a regular file; never a symlink, directory or device."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise WriteFailed("refusing to replace a symlink planted at a target", path=path)
    if not stat.S_ISREG(st.st_mode):
        raise WriteFailed("target exists and is not a regular file", path=path)


@dataclass
class _Staged:
    spec: FileSpec
    dir_fd: int
    name: str
    tmp: str


def _stage(root_fd: int, spec: FileSpec, dir_mode: int, seq: int) -> _Staged:
    dfd = open_parent(root_fd, spec.path, create=True, dir_mode=dir_mode)
    name = spec.path.rsplit("/", 1)[1]
    tmp = f".{name}.guest-agent-{os.getpid()}-{seq}.tmp"
    staged = _Staged(spec, dfd, name, tmp)
    try:
        check_target(dfd, name, spec.path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            os.fchmod(fd, spec.mode)  # before any byte: no window with a wider mode (umask-proof)
            if spec.uid is not None or spec.gid is not None:
                os.fchown(fd, -1 if spec.uid is None else spec.uid, -1 if spec.gid is None else spec.gid)
            view = memoryview(spec.content)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _discard(staged)
        raise
    return staged


def _discard(s: _Staged) -> None:
    try:
        os.unlink(s.tmp, dir_fd=s.dir_fd)
    except OSError:
        pass
    os.close(s.dir_fd)


def apply(specs: list[FileSpec], *, root: str, dir_mode: int = 0o755) -> None:
    """Write every spec or none of them (see the module docstring)."""
    try:
        os.makedirs(root, exist_ok=True)  # --root names a scratch dir that may not exist yet
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise WriteFailed("cannot open the root directory", root=root, error=exc.strerror) from exc
    staged: list[_Staged] = []
    try:
        for seq, spec in enumerate(specs):
            try:
                staged.append(_stage(root_fd, spec, dir_mode, seq))
            except (OSError, WriteFailed) as exc:
                for s in staged:
                    _discard(s)
                staged = []
                if isinstance(exc, WriteFailed):
                    raise
                raise WriteFailed("cannot write a config file", path=spec.path, error=exc.strerror) from exc
        dirs: dict[tuple[int, int], int] = {}
        for s in staged:
            os.rename(s.tmp, s.name, src_dir_fd=s.dir_fd, dst_dir_fd=s.dir_fd)
            st = os.fstat(s.dir_fd)
            dirs.setdefault((st.st_dev, st.st_ino), s.dir_fd)
        for dfd in dirs.values():
            os.fsync(dfd)  # make the renames durable
    finally:
        for s in staged:
            os.close(s.dir_fd)
        os.close(root_fd)


def write_atomic(path: str, content: bytes, *, root: str = "/", mode: int = 0o600) -> None:
    """One file, same guarantees: the only way the agent writes anything."""
    apply([FileSpec(path, content, mode, source="agent")], root=root)
