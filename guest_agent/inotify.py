"""inotify(7) on one directory, through ctypes (the standard library has no binding).

Only what the byom delivery wait needs: a non-blocking watch descriptor to poll, and the
events read from it as (mask, name) pairs.  Records are parsed from a bounded buffer
(struct inotify_event: int wd, uint32 mask, cookie, len, then `len` bytes of name,
NUL-padded), so a burst of events never grows memory.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from types import TracebackType

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_DONT_FOLLOW = 0x02000000
GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED  # the watched directory is no more

_EVENT = struct.Struct("=iIII")
_BUFSIZE = 64 * 1024  # far more than one record (16 bytes + NAME_MAX + 1)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    return libc


def _check(ret: int, what: str, path: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


class DirWatch:
    """A watch on one directory (never through a symlink), for the events in `mask`."""

    def __init__(self, directory: str, mask: int) -> None:
        libc = _libc()
        self.fd = _check(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC), "inotify_init1", directory)
        try:
            _check(
                libc.inotify_add_watch(self.fd, os.fsencode(directory), mask | IN_ONLYDIR | IN_DONT_FOLLOW),
                "inotify_add_watch",
                directory,
            )
        except BaseException:
            os.close(self.fd)
            raise

    def fileno(self) -> int:
        return self.fd

    def read(self) -> list[tuple[int, str]]:
        """The events queued now (none if nothing is pending)."""
        try:
            buf = os.read(self.fd, _BUFSIZE)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EINTR):
                return []
            raise
        return parse(buf)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> DirWatch:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def parse(buf: bytes) -> list[tuple[int, str]]:
    """(mask, name) per record; a truncated record at the end is dropped."""
    out = []
    off = 0
    while off + _EVENT.size <= len(buf):
        _wd, mask, _cookie, length = _EVENT.unpack_from(buf, off)
        off += _EVENT.size
        if off + length > len(buf):
            break
        name = buf[off : off + length].split(b"\0", 1)[0]
        off += length
        out.append((mask, os.fsdecode(name)))
    return out
