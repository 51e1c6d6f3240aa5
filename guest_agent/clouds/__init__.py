"""Cloud detection from local facts, and the registry of user-data sources.

Detection reads DMI strings under /sys/class/dmi/id (cloud-init ds-identify) and looks for a
cidata seed; it never touches the network.  Each provider module exposes `fetch(ctx)`
returning the raw user-data bytes and raising `transport.Retry` for "not yet".
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

from guest_agent.config import Config, under_root

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
AZURE_CHASSIS_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"  # cloud-init ds-identify is_azure_chassis


@dataclass(frozen=True)
class Facts:
    dmi: dict[str, str] = field(default_factory=dict)
    cidata_seed: bool = False  # <mount_dir>/user-data exists (byom SFTP, docker bind mount)

    def get(self, name: str) -> str:
        return self.dmi.get(name, "")


def read_facts(root: str, cfg: Config) -> Facts:
    base = under_root(root, "/sys/class/dmi/id")
    dmi: dict[str, str] = {}
    for name in DMI_FIELDS:
        try:
            with open(base / name, "rb") as f:
                dmi[name] = f.read(256).decode("utf-8", "replace").strip()
        except OSError:
            continue  # absent (s390x, containers) or root-only (product_serial): not fatal
    seed = os.path.isfile(under_root(root, cfg.cidata.mount_dir) / "user-data")
    return Facts(dmi, seed)


def detect(facts: Facts) -> str:
    """Which user-data source to use; pure, ordered like CAA's heuristics but DMI-only."""
    if facts.cidata_seed:
        return "cidata"
    sys_vendor, product = facts.get("sys_vendor"), facts.get("product_name")
    if facts.get("chassis_asset_tag") == AZURE_CHASSIS_ASSET_TAG or (
        "Microsoft Corporation" in (sys_vendor, facts.get("board_vendor")) and product == "Virtual Machine"
    ):
        return "azure"
    if (
        "Amazon EC2" in (product, sys_vendor, facts.get("board_vendor"), facts.get("bios_vendor"))
        or "amazon" in facts.get("bios_version")
        or facts.get("product_uuid").lower().startswith("ec2")
    ):
        return "aws"
    if (
        product in ("Google Compute Engine", "Google")
        or facts.get("board_vendor") == "Google"
        or facts.get("product_serial").startswith("GoogleCloud-")
    ):
        return "gcp"
    if sys_vendor == "Alibaba Cloud" or product == "Alibaba Cloud ECS":
        return "alibaba"
    if facts.get("chassis_vendor").startswith("IBM:Cloud Compute Server"):
        return "ibmcloud"
    # libvirt / byom / unknown KVM: a cidata config disk is the only remaining source.
    return "cidata"


@dataclass
class FetchContext:
    cfg: Config
    root: str
    deadline: Deadline
    backoff: Backoff
    state: dict[str, Any] = field(default_factory=dict)  # per-provider state across attempts (tokens)


def provider_module(name: str) -> ModuleType:
    """Import only the provider in use (each pulls in its own helpers)."""
    import importlib

    if name not in ("azure", "aws", "gcp", "alibaba", "ibmcloud", "cidata"):
        raise ValueError(f"unknown provider {name!r}")
    if name == "azure":
        return importlib.import_module("guest_agent.azure.imds")  # Azure's modules live together
    return importlib.import_module(f"guest_agent.clouds.{name}")


def metadata_address(name: str, cfg: Config) -> str | None:
    """The address the network wait needs a route to (None: no network needed)."""
    url = {
        "azure": cfg.azure.imds_url,
        "aws": cfg.aws.imds_url,
        "gcp": cfg.gcp.metadata_url,
        "alibaba": cfg.alibaba.metadata_url,
        "ibmcloud": cfg.ibmcloud.metadata_url,
    }.get(name)
    if not url:
        return None
    from guest_agent.httpio import split_url

    return split_url(url).host
