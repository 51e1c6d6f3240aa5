"""Command line: `guest-agent run|provision|check|timeline|config|report-ready|report-failure|netns`.

Exit codes follow sysexits(3) (errors.EXIT_CODES, listed by --help and guest-agent(8)).  Every
failure prints a one-line reason.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Sequence
from typing import Any, NoReturn

from guest_agent import __version__
from guest_agent.config import Config, root_path, under_root
from guest_agent.errors import (
    EXIT_CODES,
    EXIT_OK,
    EXIT_SOFTWARE,
    EXIT_USAGE,
    AgentError,
    InputMissing,
    NoPermission,
    UnhandledError,
)
from guest_agent.log import logger

log = logger("guest_agent.cli")

EPILOG = (
    "configuration: /etc/guest-agent/config.toml, then /etc/guest-agent/config.d/*.toml by name, "
    "then --config FILE (all under --root); `guest-agent config` prints the result.\n\nexit status:\n"
    + "\n".join(f"  {code:3}  {text}" for code, text in EXIT_CODES.items())
    + "\n\nSee guest-agent(8)."
)


def _parser() -> argparse.ArgumentParser:
    class _Parser(argparse.ArgumentParser):
        """Usage errors exit 64 (EX_USAGE), not argparse's 2."""

        def error(self, message: str) -> NoReturn:
            self.print_usage(sys.stderr)
            self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    p = _Parser(
        prog="guest-agent",
        description="Early-boot agent for peer-pod VMs: user-data to /run/peerpod, initdata measurement, Ready.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"guest-agent {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_root(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--root", default="/", help="prefix for every guest path read or written (default /)")
        sp.add_argument("--config", help="extra TOML config file, applied last")
        return sp

    def cmd(parent: Any, name: str, help: str, description: str) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(
            name,
            help=help,
            description=textwrap.fill(f"{help[0].upper()}{help[1:]}: {description}", 78),
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        return sp

    with_root(
        cmd(
            sub,
            "run",
            "the boot path (what the systemd unit runs)",
            "detect the cloud, wait for a route to its metadata service, fetch and validate user-data, write "
            "/run/peerpod, measure initdata, send READY=1, and on Azure report Ready (NotReady on failure).",
        )
    )
    sp = with_root(
        cmd(
            sub,
            "provision",
            "offline: decode, validate and write user-data from a file",
            "the write and measure half of `run`, from a file instead of a metadata service; no fabric report.",
        )
    )
    sp.add_argument("--user-data", required=True, help="user-data file")
    sp = with_root(
        cmd(
            sub,
            "check",
            "validate user-data and print what would be written",
            "writes nothing: prints each file's path, mode, size and sha256, and the initdata digest and "
            "the PCR extend value.",
        )
    )
    sp.add_argument("file", help="user-data file")
    sp = with_root(
        cmd(
            sub,
            "timeline",
            "print the last run's stages",
            "start and end (CLOCK_MONOTONIC, seconds since boot) of each stage of the last `run` or "
            "`provision`, from /run/guest-agent/timeline.json.",
        )
    )
    sp.add_argument("--json", action="store_true", help="the raw timeline.json")
    with_root(
        cmd(
            sub,
            "config",
            "print the effective configuration and where each value came from",
            "the configuration after every file, as TOML, each value commented with the file that set it or "
            "`default`; an invalid file exits 78 naming the key and the rule.",
        )
    )
    sp = with_root(
        cmd(
            sub,
            "report-ready",
            "report Ready to the Azure wireserver",
            "by hand, as `run` does after provisioning; the JSON health endpoint, else goal state + XML.",
        )
    )
    sp.add_argument("--force", action="store_true", help="even after NotReady was reported in this boot")
    sp = with_root(
        cmd(
            sub,
            "report-failure",
            "report NotReady/ProvisioningFailed to the Azure wireserver",
            "by hand, with the reason shown in the Azure portal and API.",
        )
    )
    sp.add_argument("--reason", required=True)
    sp = cmd(
        sub,
        "netns",
        "rerun a pod network step by hand",
        "the pod network namespace and the pod's IMDS NAT (needs CAP_SYS_ADMIN and CAP_NET_ADMIN).",
    )
    nsub = sp.add_subparsers(dest="netns_command", required=True)
    with_root(
        cmd(
            nsub,
            "ensure",
            "create the pod network namespace (idempotent)",
            "what netns@podns.service does in the image: /run/netns/<name> with lo up.",
        )
    )
    ip = with_root(
        cmd(
            nsub,
            "imds-nat",
            "give the pod access to IMDS (waits for the pod address)",
            "what guest-agent-imds-nat.service runs: a proxy-ARP veth pair and an nftables MASQUERADE rule; "
            "exits 0 once set up.",
        )
    )
    ip.add_argument("--pod-ip", help="skip waiting: use this pod address")
    ip.add_argument("--imds", help="metadata address (default: from config)")
    return p


def _read(path: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as exc:
        raise InputMissing("cannot read the user-data file", path=path, error=exc.strerror) from exc


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    from guest_agent import log as agent_log

    log_fields = agent_log.setup(agent_log.DEBUG if args.verbose else agent_log.INFO)
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
    except PermissionError as exc:  # e.g. netns commands without CAP_NET_ADMIN: not a bug
        denied = NoPermission("permission denied (run as root with CAP_SYS_ADMIN and CAP_NET_ADMIN)", error=str(exc))
        log.error("%s", denied.describe())
        return denied.exit_code
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
        plan = boot.provision(_read(args.user_data, cfg.limits.max_user_data_bytes), cfg, root, tl)
        boot.log_written(plan)
        boot.write_timeline(tl, cfg, root)
        return EXIT_OK
    if args.command == "check":
        return _check(args.file, cfg)
    if args.command == "timeline":
        return _timeline(cfg, root, as_json=args.json)
    if args.command in ("report-ready", "report-failure"):
        from guest_agent.azure.fabric import AzureFabric
        from guest_agent.errors import FabricError

        fabric = AzureFabric(cfg.azure, root=root, state_dir=cfg.state_dir)
        if args.command == "report-ready" and args.force and fabric.not_ready_reported():
            log.warning("NotReady was reported in this boot; reporting Ready anyway (--force)")
            os.unlink(fabric.marker)
        res = fabric.report_ready({}) if args.command == "report-ready" else fabric.report_failure(args.reason, {})
        if res is None:
            raise FabricError("the wireserver did not acknowledge the report (or azure.report_ready is off)")
        print(
            f"acknowledged: {res.state} via the {res.flavour} endpoint, HTTP {res.status}, {res.round_trips} requests"
        )
        return EXIT_OK
    if args.command == "netns":
        return _netns(args, cfg, root)
    if args.command == "config":
        return _config(root, args.config)
    raise AssertionError(args.command)


def _check(path: str, cfg: Config) -> int:
    import hashlib

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
    for path in plan.skipped_paths:
        print(f"skipped (not on the allow-list): {path}")
    for key in plan.skipped_initdata_keys:
        print(f"skipped initdata [data] key: {key}")
    return EXIT_OK


def _config(root: str, extra: str | None) -> int:
    """The effective configuration as TOML (usable as a config file), each value commented with
    the file that set it last, or "default"."""
    from guest_agent import config

    cfg, origins = config.load_with_origins(root, extra)
    print("# guest-agent: effective configuration; load order: defaults,", config.SYSTEM_CONFIG + ",")
    print(f"# {config.SYSTEM_CONFIG_DIR}/*.toml by name, --config FILE (under --root {root})")
    section = ""
    for key, value in config.items(cfg):
        head, _, name = key.rpartition(".")
        if head != section:
            print(f"\n[{head}]")
            section = head
        print(f"{name} = {_toml(name, value)}  # {origins.get(key, 'default')}")
    return EXIT_OK


def _toml(name: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and name.endswith("_mode"):
        return f"0o{value:o}"
    if isinstance(value, str):
        import json

        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(name, v) for v in value) + "]"
    return repr(value)


def _timeline(cfg: Config, root: str, *, as_json: bool) -> int:
    import json

    path = under_root(root, cfg.state_dir) / "timeline.json"
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise InputMissing("no readable timeline of a previous run", path=str(path), error=str(exc)) from exc
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
    from guest_agent import clouds
    from guest_agent.podnet import netns

    run_dir = root_path(root, cfg.netns.run_dir)
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
