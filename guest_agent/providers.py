"""The registry of clouds: one `Provider` entry per cloud, in detection order.

Everything the agent knows about a cloud outside its fetch code is here: its name (the
`provider = ...` config values are these names), how the DMI strings under /sys/class/dmi/id
identify it, which configuration key holds its metadata URL (the address the network wait needs
a route to and the pod's IMDS NAT forwards to), the module whose `fetch(ctx)` returns its
user-data, and, for Azure, the module that reports health to the fabric.  `config.PROVIDERS`,
`clouds.detect`, `clouds.provider_module` and `clouds.metadata_address` all read this table;
tests/test_providers.py checks they agree.  docs/adding-a-cloud.md walks through adding one.

The entries are data and small pure functions, not the cloud modules themselves: detection runs
on every boot and must not import every cloud's fetch code (each costs 2-60 ms to import on the
development host, all six 50-130 ms, 5 interleaved runs with time.perf_counter around the imports;
noisy, shared machine), so only the module of the cloud in use is imported.  This module imports
nothing of the agent, so config.py can read it.

DMI rules follow cloud-init's ds-identify (canonical/cloud-init tools/ds-identify:
dscheck_Azure/Ec2/GCE/AliYun/IBMCloud/OpenStack); CAA's own heuristics are in cloud-api-adaptor
src/cloud-api-adaptor/pkg/userdata/provision.go.

IBM Z (s390x) has no DMI, and nothing there names a cloud (docs/adding-a-cloud.md, "Platforms
without DMI"): an entry's `undetectable_on` recognises such a platform from /proc/sysinfo, so that
`auto` says which provider the image has to configure instead of silently using cidata.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Dmi = Callable[[str], str]  # DMI field name ("sys_vendor") -> its value, "" if absent
Sysinfo = Callable[[str], str]  # /proc/sysinfo field name ("VM00 Control Program") -> its value, "" if absent

AZURE_CHASSIS_ASSET_TAG = "7783-7084-3265-9085-8269-3286-77"  # cloud-init ds-identify is_azure_chassis
# Nova's SMBIOS product name (RDO packages say "OpenStack Compute"), and the chassis asset tags
# public OpenStack clouds set (cloud-init ds-identify dscheck_OpenStack); exact strings.
OPENSTACK_PRODUCT_NAMES = ("OpenStack Nova", "OpenStack Compute")
OPENSTACK_ASSET_TAGS = (
    *OPENSTACK_PRODUCT_NAMES,
    "OpenTelekomCloud",
    "SAP CCloud VM",
    "HUAWEICLOUD",
    "Samsung Cloud Platform",
)


@dataclass(frozen=True, slots=True)
class Provider:
    """One cloud."""

    name: str
    matches: Callable[[Dmi], bool]  # pure: these DMI strings identify the cloud
    fetch_module: str  # defines fetch(ctx: clouds.FetchContext) -> bytes, imported only when in use
    metadata_url_key: str | None  # "section.key" of the configured metadata URL; None: no network needed
    reporter_module: str | None = None  # reports Ready/NotReady to the cloud's fabric (Azure)
    # pure: a platform without DMI where the cloud runs but looks like other hosts; `auto` then
    # stays with cidata and warns that an image for this cloud must configure it
    undetectable_on: Callable[[Sysinfo], bool] | None = None


def _azure(dmi: Dmi) -> bool:
    return dmi("chassis_asset_tag") == AZURE_CHASSIS_ASSET_TAG or (
        "Microsoft Corporation" in (dmi("sys_vendor"), dmi("board_vendor")) and dmi("product_name") == "Virtual Machine"
    )


def _aws(dmi: Dmi) -> bool:
    return (
        "Amazon EC2" in (dmi("product_name"), dmi("sys_vendor"), dmi("board_vendor"), dmi("bios_vendor"))
        or "amazon" in dmi("bios_version")
        or dmi("product_uuid").lower().startswith("ec2")
    )


def _gcp(dmi: Dmi) -> bool:
    return (
        dmi("product_name") in ("Google Compute Engine", "Google")
        or dmi("board_vendor") == "Google"
        or dmi("product_serial").startswith("GoogleCloud-")
    )


def _alibaba(dmi: Dmi) -> bool:
    return dmi("sys_vendor") == "Alibaba Cloud" or dmi("product_name") == "Alibaba Cloud ECS"


def _ibmcloud(dmi: Dmi) -> bool:
    return dmi("chassis_vendor").startswith("IBM:Cloud Compute Server")


def _openstack(dmi: Dmi) -> bool:
    return dmi("product_name") in OPENSTACK_PRODUCT_NAMES or dmi("chassis_asset_tag") in OPENSTACK_ASSET_TAGS


def _ibm_z_kvm_guest(sysinfo: Sysinfo) -> bool:
    # The machine's maker (STSI 1.1.1) and the hypervisor's control program (STSI 3.2.2), which the
    # KVM host fills in as "KVM/Linux" (Linux arch/s390/kvm/priv.c, QEMU target/s390x/kvm): the same
    # on IBM Cloud VPC, on CAA's libvirt provider on an s390x host and on any LinuxONE.
    return sysinfo("Manufacturer") == "IBM" and sysinfo("VM00 Control Program") == "KVM/Linux"


def _always(dmi: Dmi) -> bool:
    return True


REGISTRY: tuple[Provider, ...] = (
    Provider("azure", _azure, "guest_agent.clouds.azure", "azure.imds_url", reporter_module="guest_agent.azure.fabric"),
    Provider("aws", _aws, "guest_agent.clouds.aws", "aws.imds_url"),
    Provider("gcp", _gcp, "guest_agent.clouds.gcp", "gcp.metadata_url"),
    Provider("alibaba", _alibaba, "guest_agent.clouds.alibaba", "alibaba.metadata_url"),
    Provider(
        "ibmcloud", _ibmcloud, "guest_agent.clouds.ibmcloud", "ibmcloud.metadata_url", undetectable_on=_ibm_z_kvm_guest
    ),
    # After the clouds with their own anchors: its strings are Nova's defaults, which any
    # OpenStack-derived cloud may keep.
    Provider("openstack", _openstack, "guest_agent.clouds.openstack", "openstack.metadata_url"),
    # libvirt, byom, unknown KVM: a cidata seed file or config disk is the only source left.  Last:
    # it matches anything.
    Provider("cidata", _always, "guest_agent.clouds.cidata", None),
)

NAMES: tuple[str, ...] = tuple(p.name for p in REGISTRY)


def get(name: str) -> Provider:
    for p in REGISTRY:
        if p.name == name:
            return p
    raise ValueError(f"unknown provider {name!r}")
