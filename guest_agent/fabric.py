"""Azure fabric reporting in place of waagent: KVP PROVISIONING_REPORT, then Ready or NotReady.

Call order from boot (the lead's boot.py):

    fabric = AzureFabric(cfg.azure, root=root)
    fabric.start_prefetch()             # right after detection: goal state in the background
    ...                                 # fetch user-data, write files, READY=1
    fabric.report_ready(stages)         # success only
    fabric.report_failure(err.describe(), stages)   # instead, when provisioning failed

Every path is under `root` (the agent's --root: "/" in production, a temp dir in tests).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from guest_agent import __version__, kvp, transport
from guest_agent.errors import AgentError, FabricError
from guest_agent.transport import Backoff, Deadline
from guest_agent.wireserver import (
    DEFAULT_BACKOFF,
    DEFAULT_WIRESERVER,
    NOT_READY,
    READY,
    ReportResult,
    WireserverClient,
    wireserver_address,
)

if TYPE_CHECKING:
    import requests

    from guest_agent.config import AzureConfig

log = logging.getLogger("guest_agent.fabric")


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def wireserver_base_url(cfg: AzureConfig, root: str) -> str:
    """cfg.wireserver_url, else ``http://<OPTION_245 from the networkd leases, or 168.63.129.16>``."""
    if cfg.wireserver_url:
        return cfg.wireserver_url.rstrip("/")
    return "http://" + wireserver_address(_under(root, cfg.lease_dir), DEFAULT_WIRESERVER)


def read_vm_id(root: str) -> str:
    """vmId from DMI (Gen1 = no /sys/firmware/efi: byte-swapped); the all-zero UUID if unreadable."""
    try:
        with open(_under(root, "/sys/class/dmi/id/product_uuid"), encoding="ascii", errors="replace") as f:
            raw = f.read(128)
    except OSError:
        return kvp.ZERO_UUID
    return kvp.vm_id_from_dmi(raw, gen1=not os.path.isdir(_under(root, "/sys/firmware/efi")))


class AzureFabric:
    def __init__(
        self,
        cfg: AzureConfig,
        *,
        root: str,
        session_factory: Callable[[], requests.Session] = transport.new_session,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        wall_clock: Callable[[], float] = time.time,
        version: str = __version__,
        backoff: Backoff = DEFAULT_BACKOFF,
    ) -> None:
        self.cfg = cfg
        self.root = root
        self.session_factory = session_factory
        self.clock = clock
        self.sleep = sleep
        self.wall_clock = wall_clock
        self.agent = f"guest-agent/{version}"
        self.backoff = backoff
        self._lock = threading.Lock()
        self._client: WireserverClient | None = None
        self._prefetch: threading.Thread | None = None
        self._failed = False
        self.kvp_written: bool | None = None  # the last report's KVP record reached the disk

    def _get_client(self) -> WireserverClient:
        """The client for the wireserver as resolved now; a lease that appeared since the
        prefetch and names another address replaces it (and its goal state)."""
        url = wireserver_base_url(self.cfg, self.root)
        with self._lock:
            if self._client is None or self._client.base_url != url:
                if self._client is not None:
                    log.info("wireserver address changed to %s since the prefetch", url)
                    self._client.cancel_prefetch()
                self._client = WireserverClient(
                    url,
                    session=self.session_factory(),
                    clock=self.clock,
                    sleep=self.sleep,
                    backoff=self.backoff,
                    connect_timeout_s=self.cfg.wireserver_connect_timeout_s,
                    read_timeout_s=self.cfg.wireserver_read_timeout_s,
                    agent_name=self.agent,
                    wall_clock=self.wall_clock,
                )
            return self._client

    def start_prefetch(self) -> None:
        """Read the goal state in a daemon thread while user-data is fetched.  Never raises.

        A GET with no side effects: it saves a round trip if this host lacks the JSON endpoint
        and costs one background request otherwise.  Creating the session there also moves the
        `requests` import off the caller's thread.
        """
        if not self.cfg.report_ready or self._prefetch is not None:
            return

        def run() -> None:
            try:
                client = self._get_client()
                client.prefetch_goal_state(
                    Deadline(self.cfg.ready_deadline_s, self.clock), session=self.session_factory()
                )
            except Exception as exc:  # never let the helper thread raise
                log.warning("goal-state prefetch could not start: %r", exc)

        self._prefetch = threading.Thread(target=run, name="wireserver-prefetch", daemon=True)
        self._prefetch.start()

    def wait_prefetch(self, timeout_s: float | None = None) -> bool:
        """Block until the prefetch thread (if any) has finished; True when it has."""
        t = self._prefetch
        if t is None:
            return True
        t.join(timeout_s)
        return not t.is_alive()

    def _write_kvp(self, result: str, reason: str | None, stages: dict[str, float]) -> None:
        kvp_dir = _under(self.root, self.cfg.kvp_dir)
        if not os.path.isdir(kvp_dir):
            log.info("no KVP directory %s: no PROVISIONING_REPORT record (not on Hyper-V?)", kvp_dir)
            self.kvp_written = False
            return
        value = kvp.build_provisioning_report(
            result,
            agent=self.agent,
            vm_id=read_vm_id(self.root),
            timestamp=self.wall_clock(),
            reason=reason,
            stages=stages,
        )
        # Flushed before the POST: the host reads KVP when the health report arrives (azure.md §4.3).
        self.kvp_written = kvp.append_report(kvp_dir, kvp.PROVISIONING_REPORT_KEY, value)

    def report_ready(self, stages: dict[str, float]) -> ReportResult | None:
        """KVP success record, then Ready until acknowledged or cfg.ready_deadline_s.

        Returns None when cfg.report_ready is off (another component reports).  Raises
        FabricError if the wireserver never acknowledges, and refuses (FabricError) after a
        failure report: a failed provisioning is never followed by Ready.
        """
        if self._failed:
            raise FabricError("refusing to report Ready after a failure report")
        self._write_kvp("success", None, stages)
        if not self.cfg.report_ready:
            log.info("azure.report_ready is off: not reporting Ready")
            return None
        return self._get_client().report(READY, deadline=Deadline(self.cfg.ready_deadline_s, self.clock))

    def report_failure(self, reason: str, stages: dict[str, float]) -> ReportResult | None:
        """KVP error record, then NotReady/ProvisioningFailed with `reason` as the Description.

        Bounded by min(ready_deadline_s, failure_deadline_s).  Never raises: the agent is
        already failing and its own error decides the exit code; returns None when the report
        was not acknowledged (or reporting is off).
        """
        self._failed = True
        try:
            self._write_kvp("error", reason, stages)
            if not self.cfg.report_ready:
                return None
            deadline = Deadline(min(self.cfg.ready_deadline_s, self.cfg.failure_deadline_s), self.clock)
            return self._get_client().report(NOT_READY, description=reason, deadline=deadline)
        except AgentError as exc:
            log.error("could not report the provisioning failure to the wireserver: %s", exc.describe())
        except Exception as exc:
            log.error("could not report the provisioning failure to the wireserver: %r", exc)
        return None
