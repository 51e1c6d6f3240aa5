"""The boot path: the only module that knows the order of the stages.

detect -> network -> fetch -> validate -> write -> measure -> READY=1 -> (Azure) report Ready.
The pod network namespace and the pod's IMDS NAT are not here: they run in units of their own
(netns@podns.service, guest-agent-imds-nat.service), so this process needs no capability.
Any AgentError before READY=1 is reported to the fabric (Azure) as NotReady with its
reason, and nothing after it runs: Ready is never reported after a failed provisioning.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from guest_agent import clouds, files, initdata, providers, transport, userdata
from guest_agent.config import Config, root_path
from guest_agent.errors import EXIT_OK, AgentError, UnhandledError
from guest_agent.log import (
    MSG_APPLIED,
    MSG_FAILED,
    MSG_FAILURE_REPORTED,
    MSG_READY_REPORTED,
    MSG_TIMELINE,
    fields,
    logger,
)
from guest_agent.notify import Notifier
from guest_agent.timeline import Timeline

if TYPE_CHECKING:
    from guest_agent.azure.fabric import AzureFabric
    from guest_agent.azure.health import ReportResult

log = logger("guest_agent.boot")


@dataclass(slots=True, eq=False)
class Deps:
    """The edges of the world, injectable for tests."""

    notifier: Notifier = field(default_factory=Notifier)
    rand: Callable[[], float] = transport.urandom_unit  # backoff jitter
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    log_fields: dict[str, str] = field(default_factory=dict)  # added to every journal entry


def warn_undetectable(facts: clouds.Facts) -> None:
    """`auto` on a machine without DMI where a cloud cannot be told from other hosts (IBM Z): say
    that cidata is a fallback and which provider an image for that cloud sets."""
    for name in clouds.undetectable(facts):
        log.warning(
            "no DMI here, and /proc/sysinfo cannot tell %s from other hosts: using cidata; set provider in "
            '/etc/guest-agent/config.d/ ("%s" on that cloud, "cidata" elsewhere) to say which',
            name,
            name,
            extra=fields(stage="detect"),
        )


def fetch_user_data(provider: str, cfg: Config, root: str, deps: Deps) -> bytes:
    module = clouds.provider_module(provider)
    ctx = clouds.FetchContext(
        cfg=cfg,
        root=root,
        deadline=transport.Deadline(cfg.fetch.deadline_s, deps.clock),
        backoff=transport.Backoff(cfg.fetch.backoff_initial_s, cfg.fetch.backoff_max_s, cfg.fetch.retry_after_max_s),
    )
    raw: bytes = transport.retry_until(
        lambda: module.fetch(ctx),
        what=f"fetching user-data ({provider})",
        deadline=ctx.deadline,
        backoff=ctx.backoff,
        sleep=deps.sleep,
        rand=deps.rand,
        on_retry=lambda text: deps.notifier.status(f"fetch: {text}"),
    )
    return raw


def _pcr_marker(cfg: Config) -> str:
    # /run is a tmpfs: the marker lives exactly as long as the PCR value, so a rerun of the
    # agent in the same boot does not extend twice (the verifier replays exactly one extend).
    return f"{cfg.state_dir}/pcr{cfg.tpm.pcr}.extended"


def check_measurement(idata: initdata.Initdata, cfg: Config, root: str) -> bool:
    """Before anything is written: True if this boot's PCR already holds this initdata.

    Raises if it holds another one: the files must not change under a measurement that no
    longer describes them."""
    marker = root_path(root, _pcr_marker(cfg))
    if not cfg.tpm.enabled or not os.path.isfile(marker):
        return False
    with open(marker) as f:
        text = f.read()
    if text.strip() == idata.digest_hex:
        return True
    from guest_agent.errors import UserDataInvalid  # 78: no retry in this boot can fix it

    raise UserDataInvalid("PCR already extended with a different initdata in this boot", pcr=cfg.tpm.pcr)


def measure(idata: initdata.Initdata, cfg: Config, root: str, *, already: bool) -> str:
    """Extend the TPM PCR with the first 32 bytes of the initdata digest, once per boot."""
    if not cfg.tpm.enabled:
        return "disabled"
    from guest_agent import tpm  # imported by warm() already in `run`

    device = root_path(root, cfg.tpm.device)
    if not tpm.tpm_present(device):
        announced = os.path.exists(root_path(root, tpm.ACPI_TPM2_TABLE))
        if not announced and cfg.tpm.absent != "error":
            say = log.warning if cfg.tpm.absent == "warning" else log.info
            say(
                "no TPM at %s: initdata not measured into a PCR",
                cfg.tpm.device,
                extra=fields(stage="measure", tpm_absent=cfg.tpm.absent),
            )
            return "absent"
        # The firmware has a TPM, or the image says it has one ([tpm] absent = "error"; s390x and
        # device-tree machines have no ACPI table): its driver may still be loading.  Skipping would
        # leave initdata unmeasured on a VM whose attestation expects it: wait for it, or fail.
        log.info(
            "%s but %s is not there yet: waiting up to %g s for its driver",
            "the firmware announces a TPM" if announced else "the configuration requires a TPM",
            cfg.tpm.device,
            cfg.tpm.device_wait_s,
            extra=fields(stage="measure"),
        )
        if not tpm.wait_for_device(device, cfg.tpm.device_wait_s):
            raise tpm.TpmError(
                "the firmware announces a TPM but its device did not appear"
                if announced
                else "no TPM device, and the configuration requires one",
                device=cfg.tpm.device,
                waited_s=cfg.tpm.device_wait_s,
            )
    if already:
        return "already"
    with tpm.connect(device) as dev:
        tpm.extend_pcr(dev, cfg.tpm.pcr, idata.pcr_extend_value)
    files.write_atomic(_pcr_marker(cfg), idata.digest_hex.encode(), root=root, mode=0o644)
    return "extended"


def provision(raw: bytes, cfg: Config, root: str, tl: Timeline) -> userdata.Plan:
    """Validate everything, write everything, measure: the part shared with `provision`."""
    digest = hashlib.sha256(raw).hexdigest()  # logged before validation: bad input is identifiable too
    log.info("user-data: %d bytes, sha256 %s", len(raw), digest, extra=fields(size=len(raw), sha256=digest))
    with tl.stage("validate", "validating user-data"):
        plan = userdata.plan(raw, cfg)
        tl.count("skipped_entries", plan.skipped)  # off the allow-list, skipped as CAA does (files.strict)
        already = check_measurement(plan.initdata, cfg, root)
    with tl.stage("write", f"writing {len(plan.files)} files to {cfg.files.peerpod_dir}"):
        files.apply(list(plan.files), root=root, dir_mode=cfg.files.dir_mode)
    with tl.stage("measure", f"measuring initdata into PCR {cfg.tpm.pcr}"):
        result = measure(plan.initdata, cfg, root, already=already)
    log.info(
        "initdata %s digest %s (%s), PCR %d: %s",
        "default" if plan.initdata_is_default else "from user-data",
        plan.initdata.digest_hex,
        plan.initdata.algorithm,
        cfg.tpm.pcr,
        result,
        extra=fields(stage="measure", initdata_digest=plan.initdata.digest_hex, pcr_result=result),
    )
    return plan


def log_written(plan: userdata.Plan) -> None:
    """One journal entry per file written, with its digest.  `run` calls it after the Ready report:
    nine entries and digests are work the host does not need to wait for (`make bench`, "route to
    IMDS appears -> Ready")."""
    for spec in plan.files:
        log.info(
            "wrote %s (%d bytes, mode %04o)",
            spec.path,
            len(spec.content),
            spec.mode,
            extra=fields(
                stage="write",
                path=spec.path,
                size=len(spec.content),
                sha256=hashlib.sha256(spec.content).hexdigest(),
                source=spec.source,
            ),
        )


def write_timeline(tl: Timeline, cfg: Config, root: str) -> None:
    try:
        files.write_atomic(f"{cfg.state_dir}/timeline.json", tl.to_json(), root=root, mode=0o644)
    except AgentError as exc:
        log.warning("cannot write the timeline: %s", exc.describe())


# Interpreter start, imports, validation, writes and the TPM extend, with room for a slow (TCG) VM.
START_SLACK_S = 60.0


def start_budget_s(cfg: Config) -> float:
    """How long `run` may take until READY=1 or its exit, from the configured deadlines: the
    network wait, the fetch, the cidata disk wait and, on Azure, the NotReady report that a failure
    still makes before exiting.  Sent as EXTEND_TIMEOUT_USEC at start, so raising a deadline in the
    configuration raises systemd's start timeout with it (the unit's TimeoutStartSec= only covers
    the time until the agent says so)."""
    network = cfg.network.deadline_s if cfg.network.wait else 0.0
    report = min(cfg.azure.failure_deadline_s, cfg.azure.ready_deadline_s) if cfg.azure.report_ready else 0.0
    tpm = cfg.tpm.device_wait_s if cfg.tpm.enabled else 0.0
    return network + cfg.fetch.deadline_s + cfg.cidata.wait_s + tpm + report + START_SLACK_S


def warm(provider: str, cfg: Config) -> None:
    """Import now, before the network wait, what the stages after it need (the provider's
    module, the TPM's), so that no import sits between the route and Ready: the agent's rule,
    held by tests/test_boot_imports.py on a real run."""
    clouds.provider_module(provider)
    if cfg.tpm.enabled:
        from guest_agent import tpm  # noqa: F401


def run(cfg: Config, root: str, deps: Deps) -> int:
    deps.notifier.extend_timeout(start_budget_s(cfg))
    tl = Timeline(clock=deps.clock, status=deps.notifier.status)
    fabric: AzureFabric | None = None
    try:
        with tl.stage("detect", "reading DMI"):
            facts = clouds.read_facts(root, cfg)
            provider = cfg.provider if cfg.provider != "auto" else clouds.detect(facts)
        deps.log_fields["GUEST_AGENT_PROVIDER"] = provider
        log.info("provider %s (%s)", provider, "configured" if cfg.provider != "auto" else "detected from DMI")
        if cfg.provider == "auto" and provider == "cidata":
            warn_undetectable(facts)
        if provider == "cidata" and cfg.cidata.wait_for_delivery:
            from guest_agent.clouds import cidata

            if cidata.delivery_pending(root, cfg.cidata):  # byom: the VM waits in a pool for its user-data
                with tl.stage("delivery"):
                    cidata.wait_for_delivery(root, cfg.cidata, deps.notifier, clock=deps.clock)
                deps.notifier.extend_timeout(start_budget_s(cfg))  # the wait's heartbeats granted less
        if providers.get(provider).reporter_module is not None and cfg.azure.report_ready:
            from guest_agent.azure.fabric import AzureFabric

            fabric = AzureFabric(
                cfg.azure,
                root=root,
                state_dir=cfg.state_dir,
                clock=deps.clock,
                sleep=deps.sleep,
                rand=deps.rand,
                on_retry=lambda text: deps.notifier.status(f"report: {text}"),
            )
        addr = clouds.metadata_address(provider, cfg)
        warm(provider, cfg)
        local = None
        if (read_local := clouds.local_reader(provider)) is not None:
            with tl.stage("local", f"looking for {provider}'s user-data on a local disk"):
                local = read_local(cfg, root)  # a config drive: no network needed
        if local is None and addr is not None and cfg.network.wait:
            from guest_agent import network

            with tl.stage("network", f"waiting for a route to {addr}"):
                route = network.wait_for_route(
                    addr,
                    deadline_s=cfg.network.deadline_s,
                    on_wait=lambda: log.info("no route to %s yet: waiting for netlink events", addr),
                )
            log.info("route to %s via ifindex %s, source %s", addr, route.ifindex, route.prefsrc)
        with tl.stage("fetch", f"fetching user-data from {provider} (deadline {cfg.fetch.deadline_s:g} s)"):
            raw = local if local is not None else fetch_user_data(provider, cfg, root, deps)
        plan = provision(raw, cfg, root, tl)
        deps.notifier.ready("config files written")
        tl.mark("ready")
        log.info("user-data applied; READY=1 sent", extra={"MESSAGE_ID": MSG_APPLIED, **fields(stage="ready")})
    except Exception as exc:
        err = exc if isinstance(exc, AgentError) else UnhandledError(exc)
        if err is not exc:
            log.exception("unexpected error")
        return fail(err, tl, cfg, root, deps, fabric)

    status = "done"
    if fabric is not None:
        try:
            with tl.stage("report-ready", "reporting Ready to the wireserver"):
                acknowledged(fabric.report_ready(tl.durations_ms()))
        except AgentError as err:
            # Exit status reflects provisioning only: the files are written and READY=1 is sent,
            # so a non-zero exit would only make systemd (Restart=on-failure) provision again.
            log.error("Ready was not acknowledged: %s", err.describe(), extra=failed_fields(err, EXIT_OK))
            status = f"done; Ready not acknowledged: {err.reason}"
    # After the report: nothing here is needed for Ready.
    log_written(plan)
    write_timeline(tl, cfg, root)
    summary(tl)
    deps.notifier.status(status)
    return EXIT_OK


def failed_fields(err: AgentError, exit_code: int) -> dict[str, object]:
    """The fields of every MSG_FAILED entry: the catalog's text substitutes all three."""
    return {"MESSAGE_ID": MSG_FAILED, **fields(reason=err.reason, exit_code=exit_code, stage=err.stage or "")}


def fail(err: AgentError, tl: Timeline, cfg: Config, root: str, deps: Deps, fabric: AzureFabric | None) -> int:
    log.error("provisioning failed: %s", err.describe(), extra=failed_fields(err, err.exit_code))
    deps.notifier.status(f"failed: {err.reason}")
    write_timeline(tl, cfg, root)
    if fabric is not None:
        try:
            with tl.stage("report-failure", "reporting NotReady to the wireserver"):
                acknowledged(fabric.report_failure(err, tl.durations_ms()))
        except AgentError as rerr:
            log.error("the failure report was not acknowledged: %s", rerr.describe())
        write_timeline(tl, cfg, root)
    return err.exit_code


def acknowledged(res: ReportResult | None) -> None:
    """The fabric's acknowledgement as a catalogued journal entry (and a console line)."""
    if res is not None:
        msg_id = MSG_READY_REPORTED if res.state == "Ready" else MSG_FAILURE_REPORTED
        log.info(
            "the fabric acknowledged %s (HTTP %d)",
            res.state,
            res.status,
            extra={"MESSAGE_ID": msg_id, **fields(stage="report", state=res.state)},
        )


def fail_early(err: AgentError, cfg: Config, root: str, deps: Deps | None = None) -> int:
    """A failure before the boot path could start (the agent's own config is invalid):
    still tell systemd and, on Azure, the fabric, so the VM fails fast."""
    deps = deps or Deps()
    deps.notifier.extend_timeout(start_budget_s(cfg))  # the NotReady report may take its deadline
    fabric = None
    try:
        provider = cfg.provider if cfg.provider != "auto" else clouds.detect(clouds.read_facts(root, cfg))
        if providers.get(provider).reporter_module is not None:
            from guest_agent.azure.fabric import AzureFabric

            fabric = AzureFabric(cfg.azure, root=root, state_dir=cfg.state_dir, clock=deps.clock, rand=deps.rand)
    except Exception as exc:  # detection itself failing must not hide the original error
        log.warning("cannot tell whether to report to the fabric: %r", exc)
    return fail(err, Timeline(clock=deps.clock), cfg, root, deps, fabric)


def summary(tl: Timeline) -> None:
    parts = " ".join(f"{k}={v:.1f}ms" for k, v in tl.durations_ms().items())
    log.info("timeline: %s", parts, extra={"MESSAGE_ID": MSG_TIMELINE})
