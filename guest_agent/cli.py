"""Command line: `guest-agent run|provision|check|timeline|report-ready|report-failure|netns`.

Exit codes (errors.py): 0 done; 78 user-data (or agent config) invalid, nothing written;
69 metadata service unreachable / no user-data by the deadline (or the fabric did not
acknowledge); 70 internal error.  Every failure prints a one-line reason.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
from collections.abc import Sequence

from guest_agent import __version__, transport
from guest_agent.config import Config, under_root
from guest_agent.errors import EXIT_OK, EXIT_SOFTWARE, AgentError, UnhandledError

log = logging.getLogger("guest_agent.cli")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="guest-agent", description="Early-boot agent for peer-pod VMs.")
    p.add_argument("--version", action="version", version=f"guest-agent {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_root(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--root", default="/", help="prefix for every guest path read or written (default /)")
        sp.add_argument("--config", help="extra TOML config file, applied last")
        return sp

    with_root(sub.add_parser("run", help="the boot path (what the systemd unit runs)"))
    sp = with_root(sub.add_parser("provision", help="offline: decode, validate and write user-data from a file"))
    sp.add_argument("--user-data", required=True, help="user-data file")
    sp = with_root(sub.add_parser("check", help="validate user-data and print what would be written"))
    sp.add_argument("file", help="user-data file")
    sp = with_root(sub.add_parser("timeline", help="print the last run's stages"))
    sp.add_argument("--json", action="store_true")
    with_root(sub.add_parser("report-ready", help="report Ready to the Azure wireserver"))
    sp = with_root(sub.add_parser("report-failure", help="report NotReady/ProvisioningFailed to the Azure wireserver"))
    sp.add_argument("--reason", required=True)
    sp = sub.add_parser("netns", help="rerun a pod network step by hand")
    nsub = sp.add_subparsers(dest="netns_command", required=True)
    with_root(nsub.add_parser("ensure", help="create the pod network namespace (idempotent)"))
    ip = with_root(nsub.add_parser("imds-nat", help="give the pod access to IMDS (waits for the pod address)"))
    ip.add_argument("--pod-ip", help="skip waiting: use this pod address")
    ip.add_argument("--imds", help="metadata address (default: from config)")
    return p


def _read(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as exc:
        raise AgentError("cannot read the user-data file", path=path, error=exc.strerror) from exc


def main(argv: Sequence[str] | None = None) -> int:
    transport.preload()  # requests' import overlaps config, DMI and the network wait
    args = _parser().parse_args(argv)
    from guest_agent import log as agent_log

    log_fields = agent_log.setup(logging.DEBUG if args.verbose else logging.INFO)
    try:
        from guest_agent import config

        try:
            cfg = config.load(args.root, args.config)
        except AgentError as err:
            if args.command == "run":
                # The VM must still fail fast: report with the default configuration.
                from guest_agent import boot

                return boot.fail_early(err, Config(), args.root)
            raise
        return _dispatch(args, cfg, log_fields)
    except AgentError as err:
        log.error("%s", err.describe())
        return err.exit_code
    except Exception as exc:
        log.exception("%s", UnhandledError(exc).describe())
        return EXIT_SOFTWARE


def _dispatch(args: argparse.Namespace, cfg: Config, log_fields: dict[str, str]) -> int:
    root: str = args.root
    if args.command == "run":
        from guest_agent import boot

        return boot.run(cfg, root, boot.Deps(log_fields=log_fields))
    if args.command == "provision":
        from guest_agent import boot
        from guest_agent.timeline import Timeline

        tl = Timeline()
        boot.provision(_read(args.user_data, cfg.limits.max_user_data_bytes), cfg, root, tl)
        boot.write_timeline(tl, cfg, root)
        return EXIT_OK
    if args.command == "check":
        return _check(args.file, cfg)
    if args.command == "timeline":
        return _timeline(cfg, root, as_json=args.json)
    if args.command in ("report-ready", "report-failure"):
        from guest_agent.errors import FabricError
        from guest_agent.fabric import AzureFabric

        fabric = AzureFabric(cfg.azure, root=root)
        res = fabric.report_ready({}) if args.command == "report-ready" else fabric.report_failure(args.reason, {})
        if res is None:
            raise FabricError("the wireserver did not acknowledge the report (or azure.report_ready is off)")
        print(
            f"acknowledged: {res.state} via the {res.flavour} endpoint, HTTP {res.status}, {res.round_trips} requests"
        )
        return EXIT_OK
    if args.command == "netns":
        return _netns(args, cfg, root)
    raise AssertionError(args.command)


def _check(path: str, cfg: Config) -> int:
    from guest_agent import userdata

    raw = _read(path, cfg.limits.max_user_data_bytes)
    plan = userdata.plan(raw, cfg)
    print(f"user-data: {len(raw)} bytes, sha256 {hashlib.sha256(raw).hexdigest()}")
    print(f"{'path':40} {'mode':>5} {'bytes':>7}  {'sha256':64}  source")
    for f in plan.files:
        print(f"{f.path:40} {f.mode:05o} {len(f.content):7}  {hashlib.sha256(f.content).hexdigest()}  {f.source}")
    src = "default (none in user-data)" if plan.initdata_is_default else "from user-data"
    print(f"initdata: {src}, {plan.initdata.algorithm} digest {plan.initdata.digest_hex}")
    print(f"PCR extend value (sha256 bank): {plan.initdata.pcr_extend_value.hex()}")
    return EXIT_OK


def _timeline(cfg: Config, root: str, *, as_json: bool) -> int:
    path = under_root(root, cfg.state_dir) / "timeline.json"
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AgentError("no readable timeline of a previous run", path=str(path), error=str(exc)) from exc
    if as_json:
        print(json.dumps(doc, indent=2))
        return EXIT_OK
    print(f"clock: {doc['clock']} (seconds since boot)")
    if doc.get("process_start") is not None:
        print(f"{'process start':16} {doc['process_start']:12.3f}")
    print(f"{'agent start':16} {doc['agent_start']:12.6f}")
    print(f"{'stage':16} {'start':>12} {'end':>12} {'ms':>10}  result")
    for s in doc["stages"]:
        end = s["end"] if s["end"] is not None else s["start"]
        result = "ok" if s["ok"] else f"FAILED: {s['error']}"
        print(f"{s['name']:16} {s['start']:12.6f} {end:12.6f} {(end - s['start']) * 1000:10.1f}  {result}")
    for name, t in doc.get("marks", {}).items():
        print(f"{name + ' (mark)':16} {t:12.6f}")
    return EXIT_OK


def _netns(args: argparse.Namespace, cfg: Config, root: str) -> int:
    from guest_agent import clouds, netns

    run_dir = str(under_root(root, cfg.netns.run_dir))
    if args.netns_command == "ensure":
        created = netns.ensure_netns(cfg.netns.name, run_dir=run_dir)
        print(f"{cfg.netns.name}: {'created' if created else 'exists'}")
        return EXIT_OK
    # The entry point of guest-agent-imds-nat.service: exit 0 once set up (or nothing to do), non-zero
    # on failure so that unit, and only that unit, retries.
    from guest_agent.log import fields

    if not (cfg.netns.enabled and cfg.netns.imds_nat) and not args.imds:
        log.info("IMDS access for the pod: off in the configuration ([netns] enabled/imds_nat)")
        return EXIT_OK
    imds = args.imds or cfg.netns.imds_addr
    if not imds:
        provider = cfg.provider if cfg.provider != "auto" else clouds.detect(clouds.read_facts(root, cfg))
        imds = clouds.metadata_address(provider, cfg)
        if imds is None:
            log.info("IMDS access for the pod: provider %s has no metadata service", provider)
            return EXIT_OK
    log.info("IMDS access for the pod: waiting for the pod's route to %s", imds, extra=fields(stage="imds-nat"))
    res = netns.setup_imds_nat(
        netns=cfg.netns.name,
        run_dir=run_dir,
        imds_addr=imds,
        table=cfg.netns.nft_table,
        deadline_s=cfg.netns.imds_nat_deadline_s,
        pod_ip=args.pod_ip,
    )
    log.info(
        "IMDS access for the pod set up: %s -> %s via %s/%s (%s)",
        res.pod_ip,
        res.imds_addr,
        res.host_veth,
        res.pod_veth,
        "veth pair created" if res.created_veth else "veth pair reused",
        extra=fields(stage="imds-nat", pod_ip=res.pod_ip, imds=res.imds_addr),
    )
    return EXIT_OK
