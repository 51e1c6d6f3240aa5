"""Entering and making network namespaces from a thread, without fork.

A network namespace is a per-thread attribute in Linux, so `unshare(CLONE_NEWNET)` and
`setns()` are done by a short-lived helper thread (through ctypes: ``os.unshare`` and
``os.setns`` arrived in Python 3.12, and the agent runs on 3.11 too).  Sockets keep the
namespace they were created in, and ``/proc/sys/net`` shows the namespace of the thread that
opens it, so the helper thread creates what it needs and ends; the calling thread never changes
namespace.  pyroute2's ``netns.create`` and ``IPRoute(netns=...)`` fork instead, which is unsafe
once the agent has started threads.  Nothing here forks, so every function may be called from any
thread at any time.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# <sched.h>, <sys/mount.h>
CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

_libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]


def _check(ret: int, what: str, path: str = "") -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path or None)


def mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    """mount(2); OSError on failure."""
    _check(
        _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags, None),
        "mount",
        target,
    )


def umount(target: str, flags: int = 0) -> None:
    """umount2(2); OSError on failure (EINVAL: not a mount point)."""
    _check(_libc.umount2(target.encode(), flags), "umount2", target)


def unshare_net() -> None:
    """Move the calling thread into a new network namespace (call it from `in_thread`)."""
    _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")


def in_thread(fn: Callable[[], T], name: str) -> T:
    """Run `fn` in a new thread and return its result (or raise its exception) here."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    result: T = box["result"]
    return result


def run_in_netns(path: str, fn: Callable[[], T]) -> T:
    """Call `fn` in a helper thread that has joined the network namespace file `path`.

    Whatever `fn` creates there (sockets, pyroute2 objects used inside `fn`) lives in
    that namespace; the calling thread's namespace is not changed.
    """

    def enter_and_run() -> T:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), "setns(CLONE_NEWNET)")
        finally:
            os.close(fd)
        return fn()

    return in_thread(enter_and_run, f"netns:{os.path.basename(path)}")
