"""Azure fabric reporting in place of waagent / azure-ready: KVP PROVISIONING_REPORT, then
Ready or NotReady.

Call order from boot:

    fabric = AzureFabric(cfg.azure, root=root, state_dir=cfg.state_dir)
    ...                                     # fetch user-data, write files, READY=1
    fabric.report_ready(stages)             # success only
    fabric.report_failure(err, stages)      # instead, when provisioning failed

Never Ready after NotReady in one boot: before the NotReady POST a marker is written under the
state directory (/run/guest-agent, a tmpfs: it lives exactly as long as the boot), and every
Ready report, in this process or a later run of the agent (systemd's Restart=, an operator),
checks it first.  The fabric may already have acted on the NotReady (the VM is being deleted);
a Ready after it would contradict what the host saw.

Every path is under `root` (the agent's --root: "/" in production, a temp dir in tests).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from guest_agent import __version__
from guest_agent.azure import kvp
from guest_agent.azure.health import DEFAULT_BACKOFF, ReportResult, WireserverClient
from guest_agent.azure.wire import DEFAULT_WIRESERVER, NOT_READY, READY, wireserver_address
from guest_agent.config import root_path
from guest_agent.errors import AgentError, FabricError
from guest_agent.log import logger
from guest_agent.transport import Backoff, Deadline, urandom_unit

if TYPE_CHECKING:
    from guest_agent.config import AzureConfig

log = logger("guest_agent.azure.fabric")

NOT_READY_MARKER = "azure-not-ready"  # under the state directory


def wireserver_base_url(cfg: AzureConfig, root: str) -> str:
    """cfg.wireserver_url, else ``http://<OPTION_245 from the networkd leases, or 168.63.129.16>``."""
    if cfg.wireserver_url:
        return cfg.wireserver_url.rstrip("/")
    return "http://" + wireserver_address(root_path(root, cfg.lease_dir), DEFAULT_WIRESERVER)


def read_vm_id(root: str) -> str:
    """vmId from DMI (Gen1 = no /sys/firmware/efi: byte-swapped); the all-zero UUID if unreadable."""
    try:
        with open(root_path(root, "/sys/class/dmi/id/product_uuid"), encoding="ascii", errors="replace") as f:
            raw = f.read(128)
    except OSError:
        return kvp.ZERO_UUID
    return kvp.vm_id_from_dmi(raw, gen1=not os.path.isdir(root_path(root, "/sys/firmware/efi")))


class AzureFabric:
    def __init__(
        self,
        cfg: AzureConfig,
        *,
        root: str,
        state_dir: str = "/run/guest-agent",
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rand: Callable[[], float] = urandom_unit,
        wall_clock: Callable[[], float] = time.time,
        version: str = __version__,
        backoff: Backoff = DEFAULT_BACKOFF,
        on_retry: Callable[[str], object] | None = None,  # STATUS= after each failed attempt
    ) -> None:
        self.cfg = cfg
        self.on_retry = on_retry
        self.root = root
        self.marker = root_path(root, f"{state_dir}/{NOT_READY_MARKER}")
        self.state_dir = state_dir
        self.clock = clock
        self.sleep = sleep
        self.rand = rand
        self.wall_clock = wall_clock
        self.agent = f"guest-agent/{version}"
        self.backoff = backoff
        self._client: WireserverClient | None = None
        # Read now, when `run` builds the fabric before the network wait: nothing of the report's
        # own reading is left for the time after the route appears.
        self.vm_id = read_vm_id(root)
        self.kvp_written: bool | None = None  # the last report's KVP record reached the disk

    def _get_client(self) -> WireserverClient:
        """The client for the wireserver as resolved now (the lease may name another address)."""
        url = wireserver_base_url(self.cfg, self.root)
        if self._client is None or self._client.base_url != url:
            self._client = WireserverClient(
                url,
                clock=self.clock,
                sleep=self.sleep,
                rand=self.rand,
                backoff=self.backoff,
                connect_timeout_s=self.cfg.wireserver_connect_timeout_s,
                read_timeout_s=self.cfg.wireserver_read_timeout_s,
                agent_name=self.agent,
                wall_clock=self.wall_clock,
                on_retry=self.on_retry,
            )
        return self._client

    def _report_text(self, result: str, err: AgentError | str | None, stages: dict[str, float]) -> str:
        """The encoded report (kvp.build_provisioning_report): the KVP value and the NotReady description."""
        reason, supporting = None, None
        if isinstance(err, AgentError):
            reason = err.reason
            supporting = {**({"stage": err.stage} if err.stage else {}), **err.supporting_data}
        elif err is not None:
            reason = err
        return kvp.build_provisioning_report(
            result,
            agent=self.agent,
            vm_id=self.vm_id,
            timestamp=self.wall_clock(),
            reason=reason,
            supporting=supporting,
            stages=stages,
        )

    def _write_kvp(self, text: str) -> None:
        kvp_dir = root_path(self.root, self.cfg.kvp_dir)
        # Flushed before the POST: the host reads KVP when the health report arrives
        # (cloud-init helpers/azure.py `_post_health_report`).
        self.kvp_written = kvp.append_report(kvp_dir, kvp.PROVISIONING_REPORT_KEY, text)

    def not_ready_reported(self) -> bool:
        return os.path.lexists(self.marker)

    def report_ready(self, stages: dict[str, float]) -> ReportResult | None:
        """KVP success record, then Ready until acknowledged or cfg.ready_deadline_s.

        Returns None when cfg.report_ready is off (another component reports).  Raises
        FabricError if the wireserver never acknowledges, and before anything is written or
        sent if NotReady was reported in this boot (by this run or an earlier one).
        """
        if self.not_ready_reported():
            raise FabricError("NotReady was already reported in this boot: never Ready after it", marker=self.marker)
        self._write_kvp(self._report_text("success", None, stages))
        if not self.cfg.report_ready:
            log.info("azure.report_ready is off: not reporting Ready")
            return None
        return self._get_client().report(READY, deadline=Deadline(self.cfg.ready_deadline_s, self.clock))

    def _mark_not_ready(self) -> None:
        """Written (and fsync'd) before the NotReady POST: once the host may have seen it, no
        Ready follows.  If the marker cannot be written, the report is still sent."""
        from guest_agent import files

        try:
            files.write_atomic(f"{self.state_dir}/{NOT_READY_MARKER}", b"NotReady\n", root=self.root, mode=0o644)
        except AgentError as exc:
            log.error("cannot write the NotReady marker %s: %s", self.marker, exc.describe())

    def report_failure(self, err: AgentError | str, stages: dict[str, float]) -> ReportResult | None:
        """KVP error record, then NotReady/ProvisioningFailed with the same encoded report as the
        Description (cloud-init, azure-init).  Bounded by min(ready_deadline_s, failure_deadline_s).

        Never raises: the agent is already failing and its own error decides the exit code;
        returns None when the report was not acknowledged (or reporting is off).
        """
        try:
            text = self._report_text("error", err, stages)
            self._write_kvp(text)
            if not self.cfg.report_ready:
                return None
            self._mark_not_ready()
            deadline = Deadline(min(self.cfg.ready_deadline_s, self.cfg.failure_deadline_s), self.clock)
            return self._get_client().report(NOT_READY, description=text, deadline=deadline)
        except AgentError as exc:
            log.error("could not report the provisioning failure to the wireserver: %s", exc.describe())
        except Exception as exc:
            log.error("could not report the provisioning failure to the wireserver: %r", exc)
        return None
