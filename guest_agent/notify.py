"""sd_notify(3) with the standard library: one datagram per message to $NOTIFY_SOCKET.

The protocol is a single AF_UNIX datagram of newline-separated `KEY=VALUE` lines to the path
in NOTIFY_SOCKET (a leading `@` names an abstract socket); systemd reads the sender's pid
from the socket credentials (sd_notify(3), systemd src/libsystemd/sd-daemon/sd-daemon.c).
`systemd.daemon` (systemd-python) would add a compiled dependency and a libsystemd dlopen for
the same sendto, so it is not used.  No NOTIFY_SOCKET (not under a Type=notify unit), an
unsupported address (vsock:) or a send error never stops provisioning: log once, carry on.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from guest_agent.log import logger

Sender = Callable[[str], bool]

log = logger("guest_agent.notify")


def socket_address(value: str | None) -> str | None:
    """NOTIFY_SOCKET as an AF_UNIX address: `/path`, or `@name` for the abstract `\\0name`."""
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None  # vsock:CID:PORT (systemd >= 254 in VMs) and anything else: not handled


def _stdlib_sender() -> Sender | None:
    raw = os.environ.get("NOTIFY_SOCKET")
    addr = socket_address(raw)
    if addr is None:
        if raw:
            log.warning("NOTIFY_SOCKET=%r is not an AF_UNIX address: not notifying systemd", raw[:80])
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def send(msg: str) -> bool:
        sock.sendto(msg.encode("utf-8"), addr)
        return True

    return send


class Notifier:
    def __init__(self, send: Sender | None = None) -> None:
        self._send = send if send is not None else _stdlib_sender()
        self._warned = False

    def notify(self, msg: str) -> bool:
        if self._send is None:
            return False
        try:
            return self._send(msg)
        except OSError as exc:
            if not self._warned:
                log.warning("cannot notify systemd: %s", exc)
                self._warned = True
            return False

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> bool:
        """Keep systemd's start timeout from expiring for `seconds` more (send again before then)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def ready(self, status: str) -> bool:
        return self.notify(f"READY=1\nSTATUS={status}")
