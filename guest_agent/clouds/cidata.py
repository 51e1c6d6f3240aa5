"""NoCloud-style `cidata` user-data: a seed file, or an ISO9660 disk labelled cidata/CIDATA.

1. `<mount_dir>/user-data` if it exists (byom SFTPs it there; the docker provider
   bind-mounted it).
2. Otherwise every block device in /sys/class/block is checked for an ISO9660 volume
   with one of the labels, and `user-data` is read straight from the device.  If none
   is there yet, the wait is event-driven: kernel uevents (NETLINK_KOBJECT_UEVENT) wake
   a rescan when a block device appears or a CD's media changes, up to `wait_s`.

byom delivery (`wait_for_delivery`): CAA's byom provider keeps pool VMs running and, when
it allocates one to a pod, writes the user-data into the VM's tmpfs `/media/cidata` over
SFTP (cloud-api-adaptor: src/cloud-providers/util/ssh.go SendFileViaSFTPWithContext:
Create, Write, Close; sshd's internal-sftp chrooted to /media, podvm/mkosi.skeleton-sftp).
The file exists, empty or partly written, before the client closes it, so a PathExists=
trigger can read it half-written.  `wait_for_delivery` waits for IN_CLOSE_WRITE (or
IN_MOVED_TO, for writers that rename into place) of `user-data` instead.  A file already
there when the agent first looks may still be open for writing (the upload began before the
agent started): a read lease (fcntl F_SETLEASE, fcntl(2)) is refused with EAGAIN exactly
while any process holds the file open for writing, so a refused lease means "wait for its
close" (`being_written`).  The file belongs to the SFTP user, so taking a lease needs
CAP_LEASE, which the unit grants.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import socket
import stat
import time
from collections.abc import Callable

from guest_agent import inotify, iso9660
from guest_agent.clouds import FetchContext
from guest_agent.config import CidataConfig, root_path
from guest_agent.errors import MetadataUnavailable, UserDataInvalid
from guest_agent.log import fields, logger
from guest_agent.notify import Notifier

log = logger("guest_agent.cidata")
NETLINK_KOBJECT_UEVENT = 15
SEED = "user-data"
# While waiting for a delivery: EXTEND_TIMEOUT_USEC every HEARTBEAT_S, each granting three
# heartbeats, so one late wakeup does not let systemd's start timeout fire.
HEARTBEAT_S = 10.0
# The kernel queues IN_CLOSE_WRITE before it drops the closing file's write access (fs/file_table.c
# __fput: fsnotify_close, then put_file_access), so the lease probe right after the event can still
# see the writer that has just closed, and no later event says when it is gone.  After such a close
# the probe is repeated every CLOSE_RECHECK_S for CLOSE_SETTLE_S; a writer still open after that is
# another one, whose own close is then waited for.
CLOSE_RECHECK_S = 0.05
CLOSE_SETTLE_S = 5.0


def read_seed(root: str, cfg: CidataConfig, limit: int) -> bytes | None:
    """<mount_dir>/user-data: a regular file only, read without blocking and bounded.

    The host controls what is there: a FIFO would block open() forever and a device node
    may act on open, so the name is lstat'ed first and only a regular file is opened
    (O_NOFOLLOW|O_NONBLOCK, then fstat: the same inode, still a regular file)."""
    path = root_path(root, f"{cfg.mount_dir}/{SEED}")
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            raise UserDataInvalid("the cidata seed is not a regular file", path=path, type=stat.filemode(st.st_mode)[0])
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MetadataUnavailable("cannot read the cidata seed file", path=path, error=exc.strerror) from exc
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(fst.st_mode):
            raise UserDataInvalid("the cidata seed was replaced while it was opened", path=path)
        chunks: list[bytes] = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, 65536))):
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise MetadataUnavailable("cannot read the cidata seed file", path=path, error=exc.strerror) from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise UserDataInvalid("user-data is larger than the size limit", limit_bytes=limit)
    return data


def being_written(path: str) -> bool:
    """True while some process holds `path` open for writing (or it is empty: created, not yet written).

    Probed with a read lease, taken and dropped at once: the kernel refuses it (EAGAIN) exactly
    while the file is open for writing anywhere.  Where no lease can be had (no CAP_LEASE and
    not the owner, or a file system without leases) the answer falls back to "empty means
    still being written", with a warning.  Absent: False.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise MetadataUnavailable("cannot open the delivered user-data", path=path, error=exc.strerror) from exc
    # Holding a lease, a writer's open(2) would send us SIGIO, whose default action ends the
    # process: ignore it for the microseconds the lease is held (main thread only: elsewhere
    # signal() raises ValueError).
    try:
        old = signal.signal(signal.SIGIO, signal.SIG_IGN)
    except ValueError:
        old = None
    try:
        try:
            fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EBUSY):
                return True
            log.warning(
                "cannot tell whether %s is still being written (no read lease: %s); a non-empty file counts as done",
                path,
                os.strerror(exc.errno or 0),
                extra=fields(stage="delivery"),
            )
            return os.fstat(fd).st_size == 0
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
        if old is not None:
            signal.signal(signal.SIGIO, old)


def delivery_pending(root: str, cfg: CidataConfig) -> bool:
    """byom: waiting is configured, mount_dir is a mount point (media-cidata.mount), and its
    user-data is absent or still being written."""
    d = root_path(root, cfg.mount_dir)
    if not (cfg.wait_for_delivery and os.path.ismount(d)):
        return False
    path = f"{d}/{SEED}"
    return not os.path.lexists(path) or being_written(path)


def wait_for_delivery(
    root: str,
    cfg: CidataConfig,
    notifier: Notifier,
    *,
    clock: Callable[[], float] = time.monotonic,
    heartbeat_s: float = HEARTBEAT_S,
    probe: Callable[[str], bool] = being_written,
) -> None:
    """Return once <mount_dir>/user-data was closed after writing (or renamed into place).

    Subscribes before looking, so a delivery between the two is not missed.  No deadline
    (delivery_deadline_s = 0) waits forever; the poll timeout is the heartbeat that keeps
    systemd's start timeout alive (or, just after a close, the re-probe of CLOSE_RECHECK_S),
    never a sleep.  `probe` is `being_written` (a test injects the kernel's close window)."""
    d = root_path(root, cfg.mount_dir)
    path = f"{d}/{SEED}"
    seed = f"{cfg.mount_dir}/{SEED}"
    mask = inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO | inotify.GONE
    try:
        watch = inotify.DirWatch(d, mask)
    except OSError as exc:
        raise MetadataUnavailable(
            "cannot watch the delivery directory", path=cfg.mount_dir, error=exc.strerror
        ) from exc
    with watch:
        # Subscribed: a close from now on is seen.  Complete already (written and closed before
        # the subscription): nothing to wait for.  Open for writing or empty: its close is to come,
        # unless it came just before the subscription (the kernel's window): probed again as well.
        settle_end: float | None = None  # re-probing after a close the probe still saw open
        if os.path.lexists(path):
            if not probe(path):
                return
            settle_end = clock() + CLOSE_SETTLE_S
        deadline = cfg.delivery_deadline_s
        end = clock() + deadline if deadline > 0 else None
        status = f"waiting for {seed} to be delivered" + (f" (up to {deadline:g} s)" if end else " (no deadline)")
        log.info("%s", status, extra=fields(stage="delivery"))
        notifier.status(status)
        poller = select.poll()
        poller.register(watch.fileno(), select.POLLIN)
        next_beat = clock()
        while True:
            now = clock()
            if settle_end is not None:
                if not probe(path):
                    log.info("%s delivered", seed, extra=fields(stage="delivery"))
                    return
                if now >= settle_end:
                    settle_end = None  # another writer has it open: its close will come
            if now >= next_beat:
                notifier.extend_timeout(3 * heartbeat_s)
                next_beat = now + heartbeat_s
            timeout = next_beat - now if end is None else min(next_beat, end) - now
            if end is not None and timeout <= 0:
                raise MetadataUnavailable("no user-data was delivered by the deadline", seed=seed, waited_s=deadline)
            if settle_end is not None:
                timeout = min(timeout, CLOSE_RECHECK_S)
            if not poller.poll(max(timeout, 0) * 1000):
                continue
            for ev, name in watch.read():
                if ev & inotify.GONE:
                    raise MetadataUnavailable("the delivery directory went away while waiting", path=cfg.mount_dir)
                if ev & inotify.IN_Q_OVERFLOW and os.path.lexists(path):
                    return  # events were lost: the best left is "it is there"
                if name == SEED and ev & (inotify.IN_CLOSE_WRITE | inotify.IN_MOVED_TO):
                    if ev & inotify.IN_CLOSE_WRITE and probe(path):
                        # the closer not yet gone, another writer, or emptied: probe again
                        settle_end = clock() + CLOSE_SETTLE_S
                        continue
                    log.info("%s delivered", seed, extra=fields(stage="delivery"))
                    return


def find_volume(
    root: str, dev_dir: str, labels: tuple[str, ...], path: str, limit: int
) -> tuple[str, bytes | None] | None:
    """The first block device (by name) carrying an ISO9660 volume with one of `labels`: its name
    and the file at `path` on it (None: the volume has no such file).  None: no such volume."""
    sysblock = root_path(root, "/sys/class/block")
    try:
        names = sorted(os.listdir(sysblock))
    except OSError:
        return None
    for name in names:
        dev = root_path(root, f"{dev_dir}/{name}")
        try:
            with open(dev, "rb") as f:
                try:
                    if iso9660.volume_label(f) not in labels:
                        continue
                    return name, iso9660.read_file(f, path, limit=limit)
                except iso9660.NotIso:
                    continue
                except iso9660.TooLarge as exc:
                    exc.supporting_data["device"] = name  # already UserDataInvalid (78): name the disk
                    raise
        except OSError:
            continue  # no medium in the drive, or a device we may not read
    return None


def scan_devices(root: str, cfg: CidataConfig, limit: int) -> bytes | None:
    """user-data from the first block device carrying an ISO9660 volume labelled cidata."""
    found = find_volume(root, cfg.dev_dir, cfg.labels, SEED, limit)
    if found is None:
        return None
    name, data = found
    if data is None:
        raise MetadataUnavailable("the cidata disk has no user-data file", device=name)
    log.info("found the cidata disk", extra={"GUEST_AGENT_DEVICE": name})
    return data


def _uevent_socket() -> socket.socket | None:
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_KOBJECT_UEVENT)
        s.bind((0, 1))  # group 1: kernel uevents
        return s
    except OSError:
        return None


def find_disk(root: str, cfg: CidataConfig, limit: int, *, wait_s: float) -> bytes | None:
    """Scan now; if nothing, rescan on each block uevent until `wait_s` passes."""
    sock = _uevent_socket() if wait_s > 0 else None  # subscribe before scanning: no missed event
    try:
        data = scan_devices(root, cfg, limit)
        end = time.monotonic() + wait_s
        while data is None and sock is not None and (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                break
            msg = sock.recv(8192)
            if b"SUBSYSTEM=block" in msg:
                data = scan_devices(root, cfg, limit)
        return data
    finally:
        if sock is not None:
            sock.close()


def fetch(ctx: FetchContext) -> bytes:
    cfg, limit = ctx.cfg.cidata, ctx.cfg.limits.max_user_data_bytes
    data = read_seed(ctx.root, cfg, limit)
    if data is None:
        data = find_disk(ctx.root, cfg, limit, wait_s=min(cfg.wait_s, ctx.deadline.remaining()))
    if data is None:
        raise MetadataUnavailable(
            "no user-data: no cidata seed file and no ISO9660 disk labelled cidata",
            seed=cfg.mount_dir + "/user-data",
            waited_s=cfg.wait_s,
        )
    return data
