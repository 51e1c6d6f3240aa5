"""Cloud detection from local facts, and the fetch side of the registry (guest_agent/providers.py).

Detection reads DMI strings under /sys/class/dmi/id (cloud-init ds-identify) and looks for a
cidata seed; without DMI (s390x) it reads /proc/sysinfo, which names the platform but no cloud
(providers.py).  It never touches the network.  Each provider's fetch module exposes `fetch(ctx)`
returning the raw user-data bytes and raising `transport.Retry` for "not yet"; one with a source
that needs no network (OpenStack's config drive) also exposes `read_local(cfg, root)`, which the
agent reads before it waits for the network (`local_reader` below).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from guest_agent.config import Config, root_path

if TYPE_CHECKING:
    from guest_agent.transport import Backoff, Deadline

DMI_FIELDS = (
    "sys_vendor",
    "product_name",
    "product_version",
    "product_serial",
    "product_uuid",
    "board_vendor",
    "bios_vendor",
    "bios_version",
    "chassis_vendor",
    "chassis_asset_tag",
)
# The /proc/sysinfo fields the registry's undetectable_on rules read (s390x; the hypervisor fills
# some of the file in, so only these are kept, each bounded).
SYSINFO_FIELDS = ("Manufacturer", "Type", "VM00 Control Program")
SYSINFO_MAX_BYTES = 64 * 1024  # a few KiB on real machines


@dataclass(frozen=True, slots=True)
class Facts:
    """What detection reads."""

    dmi: dict[str, str]
    cidata_seed: bool = False  # <mount_dir>/user-data exists (byom SFTP, docker bind mount)
    sysinfo: dict[str, str] = field(default_factory=dict)  # read only where there is no DMI

    def get(self, name: str) -> str:
        return self.dmi.get(name, "")

    def get_sysinfo(self, name: str) -> str:
        return self.sysinfo.get(name, "")


def read_facts(root: str, cfg: Config) -> Facts:
    base = root_path(root, "/sys/class/dmi/id")
    dmi: dict[str, str] = {}
    for name in DMI_FIELDS:
        try:
            with open(os.path.join(base, name), "rb") as f:
                dmi[name] = f.read(256).decode("utf-8", "replace").strip()
        except OSError:
            continue  # absent (s390x, containers) or root-only (product_serial): not fatal
    seed = os.path.isfile(os.path.join(root_path(root, cfg.cidata.mount_dir), "user-data"))
    return Facts(dmi, seed, {} if dmi else read_sysinfo(root))


def read_sysinfo(root: str) -> dict[str, str]:
    """The SYSINFO_FIELDS of /proc/sysinfo ("Name:   value" lines), {} where there is none (not s390x)."""
    try:
        with open(root_path(root, "/proc/sysinfo"), "rb") as f:
            text = f.read(SYSINFO_MAX_BYTES).decode("utf-8", "replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() in SYSINFO_FIELDS:
            out.setdefault(name.strip(), value.strip()[:256])  # VM00 is the guest's own level
    return out


def detect(facts: Facts) -> str:
    """Which user-data source to use: a cidata seed file wins, then the first registry entry
    (guest_agent/providers.py) whose DMI rule matches; pure, DMI-only (no network probe)."""
    from guest_agent import providers

    if facts.cidata_seed:
        return "cidata"
    return next(p.name for p in providers.REGISTRY if p.matches(facts.get))


def undetectable(facts: Facts) -> tuple[str, ...]:
    """The clouds this machine may be on that detect() cannot tell apart here (no DMI: IBM Z, where
    detect() falls back to cidata): an image for one of them configures `provider` itself."""
    from guest_agent import providers

    if facts.cidata_seed or facts.dmi:  # sysinfo is read only without DMI; a seed says it is cidata
        return ()
    return tuple(p.name for p in providers.REGISTRY if p.undetectable_on and p.undetectable_on(facts.get_sysinfo))


@dataclass(slots=True, eq=False, kw_only=True)
class FetchContext:
    """What a provider's fetch() gets."""

    cfg: Config
    root: str
    deadline: Deadline
    backoff: Backoff
    state: dict[str, Any] = field(default_factory=dict)  # per-provider state across attempts (tokens)


def provider_module(name: str) -> ModuleType:
    """Import only the provider in use (each pulls in its own helpers)."""
    from guest_agent import providers

    return importlib.import_module(providers.get(name).fetch_module)


def local_reader(name: str) -> Callable[[Config, str], bytes | None] | None:
    """Provider `name`'s `read_local(cfg, root)`: its user-data from a source that needs no network
    (None: not attached), which spares the network wait and fetch().  None: it has no such source."""
    read: Callable[[Config, str], bytes | None] | None = getattr(provider_module(name), "read_local", None)
    return read


def metadata_address(name: str, cfg: Config) -> str | None:
    """The address the network wait needs a route to (None: no network needed)."""
    from guest_agent import providers

    key = providers.get(name).metadata_url_key
    if key is None:
        return None
    section, _, field_name = key.partition(".")
    url: str = getattr(getattr(cfg, section), field_name)
    if not url:
        return None
    from guest_agent.httpio import split_url

    return split_url(url).host
