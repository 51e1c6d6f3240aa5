"""Agent configuration: frozen dataclasses whose defaults are the documentation, validated at load.

Load order (later wins, key by key):
  1. the defaults below;
  2. ``/etc/guest-agent/config.toml``;
  3. ``/etc/guest-agent/config.d/*.toml``, sorted by file name;
  4. ``--config FILE``.
The two ``/etc`` locations are read under ``--root``.  Unknown sections or keys
and wrongly typed values are errors (exit 78): a typo must not silently fall
back to a default on a machine nobody can log in to.
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import TYPE_CHECKING, Any

from guest_agent import httpio
from guest_agent.errors import ConfigError
from guest_agent.providers import NAMES

if TYPE_CHECKING:
    from pathlib import Path

PROVIDERS = ("auto", *NAMES)  # the registry's clouds (guest_agent/providers.py)

# CAA's write_files allow-list (cloud-api-adaptor pkg/userdata/provision.go), exact paths.
DEFAULT_ALLOWED_PATHS = (
    "/run/peerpod/apf.json",
    "/run/peerpod/auth.json",
    "/run/peerpod/initdata",
    "/run/peerpod/scratch-space.marker",
    "/run/peerpod/aa.toml",
    "/run/peerpod/cdh.toml",
)


@dataclass(frozen=True, slots=True)
class FetchConfig:
    """How user-data is fetched from any metadata service."""

    deadline_s: float = 180.0  # give up (exit 69) after this long; CAA's --user-data-fetch-timeout
    connect_timeout_s: float = 1.0  # short: a link-local service answers in ms or not at all
    read_timeout_s: float = 5.0
    backoff_initial_s: float = 0.1  # first retry delay; doubles per attempt ...
    backoff_max_s: float = 2.0  # ... up to this cap
    retry_after_max_s: float = 30.0  # a server's Retry-After is honoured up to this (and the deadline)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Size caps on untrusted input (the host is untrusted)."""

    max_user_data_bytes: int = 256 * 1024  # raw bytes as received (GCP allows 256 KiB per value)
    max_decoded_bytes: int = 1024 * 1024  # after every base64/gzip layer (gzip bombs)
    max_file_bytes: int = 512 * 1024  # one write_files entry, decoded


@dataclass(frozen=True, slots=True)
class FilesConfig:
    """Which files user-data may write, and where the pod VM keeps them."""

    allowed_paths: tuple[str, ...] = DEFAULT_ALLOWED_PATHS
    default_mode: int = 0o600  # they hold TLS keys and registry credentials
    dir_mode: int = 0o755  # for /run/peerpod when the agent has to create it
    peerpod_dir: str = "/run/peerpod"
    # false: a well-formed path off the allow-list, or an unknown initdata [data] key, is skipped
    # with a warning, as CAA does; true: such a document is refused whole (exit 78).
    strict: bool = False


@dataclass(frozen=True, slots=True)
class TpmConfig:
    """Measurement of initdata into a TPM PCR (CAA PR #1999 / #2186)."""

    enabled: bool = True
    device: str = "/dev/tpmrm0"  # resource manager; absent device = no TPM (see `absent`) ...
    # ... unless the firmware announces one (ACPI TPM2 table): then its driver is still loading, so wait
    # this long for the device (inotify), and fail (exit 69, NotReady on Azure) if it does not come.
    device_wait_s: float = 30.0
    pcr: int = 8  # unused by systemd-boot/UKI images; what CAA's verifier replays
    # A missing TPM the firmware does not announce: "info" (a log line: VM sizes without a vTPM),
    # "warning" (a warning: the image expects one, initdata goes unmeasured), or "error" (the image
    # requires one: wait device_wait_s for it, then exit 69, NotReady on Azure).
    absent: str = "info"


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """Waiting for a route to the metadata address by netlink events."""

    wait: bool = True
    deadline_s: float = 120.0  # no route by then: exit 69 (and NotReady on Azure)


@dataclass(frozen=True, slots=True)
class NetnsConfig:
    """The pod network namespace and the pod's path to IMDS."""

    enabled: bool = True
    name: str = "podns"
    run_dir: str = "/run/netns"
    imds_nat: bool = True  # `guest-agent netns imds-nat` (its own unit): proxy-ARP veth + MASQUERADE
    imds_nat_deadline_s: float = 300.0  # wait this long for APF to give the pod its address
    imds_addr: str = ""  # address the pod reaches through the NAT; "" = the provider's metadata address
    nft_table: str = "guest_agent"


@dataclass(frozen=True, slots=True)
class AzureConfig:
    """Azure: user-data from IMDS, the KVP record and the Ready/NotReady report to the wireserver."""

    imds_url: str = "http://169.254.169.254"
    # compute/userData exists from api-version 2021-01-01; format=text returns the base64 string.
    user_data_path: str = "/metadata/instance/compute/userData?api-version=2021-01-01&format=text"
    # "" = OPTION_245 from systemd-networkd's lease files, else 168.63.129.16.
    wireserver_url: str = ""
    lease_dir: str = "/run/systemd/netif/leases"
    report_ready: bool = True
    ready_deadline_s: float = 1200.0  # the fabric gives up on the VM after about 20 minutes
    kvp_dir: str = "/var/lib/hyperv"  # PROVISIONING_REPORT goes to .kvp_pool_1 here, if it exists
    # A failure report gets its own, shorter budget (capped by ready_deadline_s): the agent is exiting anyway.
    failure_deadline_s: float = 300.0
    wireserver_connect_timeout_s: float = 2.0  # short, retried: early in boot the route may be seconds away
    wireserver_read_timeout_s: float = 10.0  # WALinuxAgent uses 10 s per request


@dataclass(frozen=True, slots=True)
class AwsConfig:
    """AWS: user-data from IMDSv2 (token first)."""

    imds_url: str = "http://169.254.169.254"
    token_ttl_s: int = 21600  # IMDSv2 token lifetime (1..21600)


@dataclass(frozen=True, slots=True)
class GcpConfig:
    """GCP: user-data from the metadata server."""

    # By IP, not metadata.google.internal: no DNS this early (afterburn does the same).
    metadata_url: str = "http://169.254.169.254"


@dataclass(frozen=True, slots=True)
class AlibabaConfig:
    """Alibaba Cloud: user-data from the metadata service (token first)."""

    metadata_url: str = "http://100.100.100.200"
    token_ttl_s: int = 21600


@dataclass(frozen=True, slots=True)
class IbmCloudConfig:
    """IBM Cloud VPC: user-data from the instance metadata service (token first)."""

    metadata_url: str = "http://169.254.169.254"
    api_version: str = "2022-03-01"
    token_expires_s: int = 300


@dataclass(frozen=True, slots=True)
class OpenStackConfig:
    """OpenStack: user-data from the config drive, else Nova's metadata service."""

    metadata_url: str = "http://169.254.169.254"
    # ISO9660 volume labels of the config drive (cloud-init accepts both; Nova writes config-2).
    # Block devices are scanned in cidata.dev_dir.  A vfat config drive is not read: the metadata
    # service is asked instead (docs/protocols.md §8).
    config_drive_labels: tuple[str, ...] = ("config-2", "CONFIG-2")


@dataclass(frozen=True, slots=True)
class CidataConfig:
    """cidata: user-data from a NoCloud/cidata volume or an existing seed file (byom, docker)."""

    mount_dir: str = "/media/cidata"  # an existing <mount_dir>/user-data wins (byom, docker)
    labels: tuple[str, ...] = ("cidata", "CIDATA")
    dev_dir: str = "/dev"  # block devices scanned for an ISO9660 volume with one of the labels
    wait_s: float = 5.0  # how long to wait for the disk to appear when DMI says QEMU/IBM
    # byom: when no cloud is detected and mount_dir is a mount point without user-data yet, wait
    # (inotify, no polling) until CAA's SFTP client has written <mount_dir>/user-data and closed it.
    wait_for_delivery: bool = False
    delivery_deadline_s: float = 0.0  # 0 = no deadline (a pool VM waits until CAA allocates it)

    def __post_init__(self) -> None:
        if self.delivery_deadline_s < 0:
            raise ConfigError("cidata.delivery_deadline_s must be >= 0 (0 = no deadline)")


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration, one section per TOML table."""

    provider: str = "auto"  # auto|azure|aws|gcp|alibaba|ibmcloud|openstack|cidata
    state_dir: str = "/run/guest-agent"  # timeline.json lives here
    fetch: FetchConfig = field(default_factory=FetchConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    files: FilesConfig = field(default_factory=FilesConfig)
    tpm: TpmConfig = field(default_factory=TpmConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    netns: NetnsConfig = field(default_factory=NetnsConfig)
    azure: AzureConfig = field(default_factory=AzureConfig)
    aws: AwsConfig = field(default_factory=AwsConfig)
    gcp: GcpConfig = field(default_factory=GcpConfig)
    alibaba: AlibabaConfig = field(default_factory=AlibabaConfig)
    ibmcloud: IbmCloudConfig = field(default_factory=IbmCloudConfig)
    openstack: OpenStackConfig = field(default_factory=OpenStackConfig)
    cidata: CidataConfig = field(default_factory=CidataConfig)


SYSTEM_CONFIG = "/etc/guest-agent/config.toml"
SYSTEM_CONFIG_DIR = "/etc/guest-agent/config.d"


def under_root(root: str, path: str) -> Path:
    """Prefix a guest path with --root (``/`` leaves it unchanged); for the commands other than
    `run`, which joins strings (root_path) and so never imports pathlib."""
    from pathlib import Path

    return Path(root) / path.lstrip("/")


def root_path(root: str, path: str) -> str:
    """under_root as a string, for the os functions the boot path calls."""
    return posixpath.join(root, path.lstrip("/"))


def config_files(root: str, extra: str | None) -> list[str]:
    """The files that exist, in load order."""
    files = []
    main = root_path(root, SYSTEM_CONFIG)
    if os.path.isfile(main):
        files.append(main)
    d = root_path(root, SYSTEM_CONFIG_DIR)
    if os.path.isdir(d):
        paths = (posixpath.join(d, name) for name in sorted(os.listdir(d)))
        files.extend(p for p in paths if posixpath.splitext(p)[1] == ".toml" and os.path.isfile(p))
    if extra is not None:
        files.append(extra)
    return files


def load(root: str = "/", extra: str | None = None) -> Config:
    return load_with_origins(root, extra)[0]


def load_with_origins(root: str = "/", extra: str | None = None) -> tuple[Config, dict[str, str]]:
    """The effective configuration, validated value by value, and for each key set by a file
    ("fetch.deadline_s") the file that set it last; keys not in the dict are defaults."""
    cfg = Config()
    origins: dict[str, str] = {}
    for path in config_files(root, extra):
        data = read_file(path)
        cfg = merge(cfg, data, where=path)
        origins.update(dict.fromkeys(_leaf_keys(data), path))
    validate(cfg, origins)
    return cfg, origins


def read_file(path: str) -> dict[str, Any]:
    """One configuration file's tables (tomllib, through safetoml)."""
    from guest_agent import safetoml

    try:
        with open(path, encoding="utf-8") as f:
            data: dict[str, Any] = safetoml.loads(f.read())
    except (OSError, UnicodeDecodeError, safetoml.DecodeError) as exc:
        raise ConfigError("agent configuration file is unreadable or not TOML", file=path, error=str(exc)) from exc
    return data


# The annotations a configuration value may have, as written (`from __future__ import annotations`
# keeps them as strings), and the type a TOML value must have for each.  tests/test_config.py
# checks every field.
VALUE_TYPES: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool, "tuple[str, ...]": tuple}


def merge(obj: Any, data: dict[str, Any], *, where: str) -> Any:
    """Return a copy of section `obj` with `data` applied, checking names and types."""
    annotations = {f.name: str(f.type) for f in fields(obj)}
    names = set(annotations)
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError("unknown key in agent configuration", key=key, file=where)
        current = getattr(obj, key)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError("configuration key must be a table", key=key, file=where)
            changes[key] = merge(current, value, where=where)
        else:
            changes[key] = _coerce(key, VALUE_TYPES[annotations[key]], value, where)
    cfg = replace(obj, **changes)
    if isinstance(cfg, Config) and cfg.provider not in PROVIDERS:
        raise ConfigError("unknown provider in agent configuration", provider=cfg.provider, file=where)
    return cfg


def _coerce(key: str, hint: type, value: Any, where: str) -> Any:
    if hint is tuple:  # tuple[str, ...]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError("configuration key must be a list of strings", key=key, file=where)
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint is bool) != isinstance(value, bool):
        raise ConfigError("configuration key has the wrong type", key=key, expected=hint.__name__, file=where)
    if not isinstance(value, hint):
        raise ConfigError("configuration key has the wrong type", key=key, expected=hint.__name__, file=where)
    return value


def as_dict(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)


def _leaf_keys(data: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out.extend(_leaf_keys(value, f"{prefix}{key}."))
        else:
            out.append(prefix + key)
    return out


# ---- Values, checked one by one at load (exit 78 before anything is fetched or written).  Each
# check returns what is wrong, or None.  Booleans need none (the type check is enough); every
# other key has one (tests/test_config.py enforces it).


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _not_negative(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _between(lo: int, hi: int) -> Callable[[int], str | None]:
    return lambda v: None if lo <= v <= hi else f"must be between {lo} and {hi}"


def _abs_path(v: str) -> str | None:
    # Normalised too: "/run/../etc" or "/run/peerpod/" would name something else than it reads.
    if not v.startswith("/") or posixpath.normpath(v) != v or "\0" in v:
        return "must be an absolute, normalised path"
    return None


def _abs_paths(v: tuple[str, ...]) -> str | None:
    bad = [p for p in v if _abs_path(p)]
    return f"must be absolute, normalised paths: {bad[0]!r}" if bad else None


def _http_url(v: str) -> str | None:
    """http://host[:port][/path]: a base URL the code appends its paths and queries to."""
    if "?" in v:
        return "must be an http:// URL with no query"
    return httpio.url_problem(v)


def _optional(check: Callable[[str], str | None]) -> Callable[[str], str | None]:
    return lambda v: None if v == "" else check(v)


_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
NFT_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")  # also podnet.netns.masquerade_ruleset's guard
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _name(v: str) -> str | None:
    # A file name under /run/netns (`ip netns add` refuses "/" and the dot names too).
    if not _NAME.fullmatch(v) or v in (".", ".."):
        return "must be 1-64 characters of A-Z a-z 0-9 _ . - (not . or ..)"
    return None


def _nft_name(v: str) -> str | None:
    return None if NFT_NAME.fullmatch(v) else "must be an nftables identifier"


def _ipv4(v: str) -> str | None:
    try:
        ipaddress.IPv4Address(v)  # dotted decimal, no leading zeros
    except ValueError:
        return "must be an IPv4 address"
    return None


def _labels(v: tuple[str, ...]) -> str | None:
    # ISO9660 volume identifiers: up to 32 d-characters (ECMA-119 8.4.6); we accept any printable.
    ok = v and all(0 < len(x) <= 32 and x.isprintable() for x in v)
    return None if ok else "must be 1-32 character volume labels, at least one"


def _one_of(*values: str) -> Callable[[str], str | None]:
    return lambda v: None if v in values else "must be one of " + ", ".join(f'"{x}"' for x in values)


def _date(v: str) -> str | None:
    return None if _DATE.fullmatch(v) else "must be a date YYYY-MM-DD"


def _query_path(v: str) -> str | None:
    return None if v.startswith("/") and not any(c in v for c in " \t\r\n#") else "must be an absolute URL path"


_MODE = _between(0, 0o7777)
CHECKS: dict[str, Callable[[Any], str | None]] = {
    "state_dir": _abs_path,
    "fetch.deadline_s": _positive,
    "fetch.connect_timeout_s": _positive,
    "fetch.read_timeout_s": _positive,
    "fetch.backoff_initial_s": _positive,
    "fetch.backoff_max_s": _positive,
    "fetch.retry_after_max_s": _not_negative,
    "limits.max_user_data_bytes": _positive,
    "limits.max_decoded_bytes": _positive,
    "limits.max_file_bytes": _positive,
    "files.allowed_paths": _abs_paths,
    "files.default_mode": _MODE,
    "files.dir_mode": _MODE,
    "files.peerpod_dir": _abs_path,
    "tpm.device": _abs_path,
    "tpm.pcr": _between(0, 23),  # a TPM 2.0 PC Client TPM has PCRs 0-23
    "tpm.device_wait_s": _not_negative,
    "tpm.absent": _one_of("info", "warning", "error"),
    "network.deadline_s": _positive,
    "netns.name": _name,
    "netns.run_dir": _abs_path,
    "netns.imds_nat_deadline_s": _positive,
    "netns.imds_addr": _optional(_ipv4),
    "netns.nft_table": _nft_name,
    "azure.imds_url": _http_url,
    "azure.user_data_path": _query_path,
    "azure.wireserver_url": _optional(_http_url),
    "azure.lease_dir": _abs_path,
    "azure.ready_deadline_s": _positive,
    "azure.kvp_dir": _abs_path,
    "azure.failure_deadline_s": _positive,
    "azure.wireserver_connect_timeout_s": _positive,
    "azure.wireserver_read_timeout_s": _positive,
    "aws.imds_url": _http_url,
    "aws.token_ttl_s": _between(1, 21600),  # IMDSv2: X-aws-ec2-metadata-token-ttl-seconds
    "gcp.metadata_url": _http_url,
    "alibaba.metadata_url": _http_url,
    "alibaba.token_ttl_s": _between(1, 21600),  # X-aliyun-ecs-metadata-token-ttl-seconds
    "ibmcloud.metadata_url": _http_url,
    "ibmcloud.api_version": _date,
    "ibmcloud.token_expires_s": _between(5, 3600),  # the VPC metadata token API's expires_in range
    "openstack.metadata_url": _http_url,
    "openstack.config_drive_labels": _labels,
    "cidata.mount_dir": _abs_path,
    "cidata.labels": _labels,
    "cidata.dev_dir": _abs_path,
    "cidata.wait_s": _not_negative,
    "cidata.delivery_deadline_s": _not_negative,  # 0 = no deadline
}


def items(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """("section.key", value) for every leaf of the configuration, in declaration order."""
    out: list[tuple[str, Any]] = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.extend(items(value, f"{prefix}{f.name}."))
        else:
            out.append((prefix + f.name, value))
    return out


def validate(cfg: Config, origins: dict[str, str] | None = None) -> None:
    """Raise ConfigError (exit 78) naming the first bad value, its rule and the file that set it."""
    for key, value in items(cfg):
        check = CHECKS.get(key)
        problem = check(value) if check is not None else None
        if problem is not None:
            where = (origins or {}).get(key, "default")
            raise ConfigError(
                "invalid value in agent configuration", key=key, value=repr(value)[:80], rule=problem, file=where
            )
    if cfg.tpm.absent == "error" and not cfg.tpm.enabled:
        raise ConfigError(
            "invalid value in agent configuration", key="tpm.absent", rule='"error" needs tpm.enabled = true'
        )
    if cfg.fetch.backoff_max_s < cfg.fetch.backoff_initial_s:
        raise ConfigError(
            "invalid value in agent configuration", key="fetch.backoff_max_s", rule="must be >= fetch.backoff_initial_s"
        )
