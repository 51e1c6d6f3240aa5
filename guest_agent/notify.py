"""sd_notify through systemd-python, tolerant of both of its failure modes.

`systemd.daemon.notify` returns False when NOTIFY_SOCKET is unset (not under a
Type=notify unit) and raises (ConnectionRefusedError, FileNotFoundError, ...) when
the socket is bad.  Neither may stop provisioning: log once and carry on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

log = logging.getLogger("guest_agent.notify")

Sender = Callable[[str], bool]


def _systemd_sender() -> Sender | None:
    if not os.environ.get("NOTIFY_SOCKET"):
        return None  # skip the ~9 ms import when nobody listens
    from systemd import daemon

    def send(msg: str) -> bool:
        return bool(daemon.notify(msg))

    return send


class Notifier:
    def __init__(self, send: Sender | None = None) -> None:
        self._send = send if send is not None else _systemd_sender()
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
