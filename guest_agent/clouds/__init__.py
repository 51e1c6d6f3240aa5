"""Cloud detection from local facts, and the fetch side of the registry (guest_agent/providers.py).

Detection reads DMI strings under /sys/class/dmi/id (cloud-init ds-identify) and looks for a
cidata seed; it never touches the network.  Each provider's fetch module exposes `fetch(ctx)`
returning the raw user-data bytes and raising `transport.Retry` for "not yet".
"""

from __future__ import annotations

import importlib
import os
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


@dataclass(frozen=True, slots=True)
class Facts:
    """What detection reads."""

    dmi: dict[str, str]
    cidata_seed: bool = False  # <mount_dir>/user-data exists (byom SFTP, docker bind mount)

    def get(self, name: str) -> str:
        return self.dmi.get(name, "")


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
    return Facts(dmi, seed)


def detect(facts: Facts) -> str:
    """Which user-data source to use: a cidata seed file wins, then the first registry entry
    (guest_agent/providers.py) whose DMI rule matches; pure, DMI-only (no network probe)."""
    from guest_agent import providers

    if facts.cidata_seed:
        return "cidata"
    return next(p.name for p in providers.REGISTRY if p.matches(facts.get))


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
