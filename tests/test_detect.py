"""Cloud detection from DMI strings (docs/protocols.md §1) and reading them from a guest root."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from guest_agent import clouds
from guest_agent.clouds import Facts
from guest_agent.config import Config
from tests import caa

CASES: dict[str, tuple[dict[str, str], str]] = {
    # Azure: the chassis asset tag alone (cloud-init ds-identify), or vendor + product
    "azure-full": (caa.AZURE_DMI, "azure"),
    "azure-asset-tag-only": ({"chassis_asset_tag": "7783-7084-3265-9085-8269-3286-77"}, "azure"),
    "azure-vendor-product": ({"sys_vendor": "Microsoft Corporation", "product_name": "Virtual Machine"}, "azure"),
    "azure-board-vendor-product": (
        {"board_vendor": "Microsoft Corporation", "product_name": "Virtual Machine"},
        "azure",
    ),
    # Nitro: product_name is the instance type, the vendor strings say Amazon EC2
    "aws-nitro": (
        {
            "sys_vendor": "Amazon EC2",
            "product_name": "m6i.large",
            "bios_vendor": "Amazon EC2",
            "board_vendor": "Amazon EC2",
        },
        "aws",
    ),
    "aws-nitro-sys-vendor-only": ({"sys_vendor": "Amazon EC2", "product_name": "trn1.32xlarge"}, "aws"),
    "aws-nitro-bios-vendor-only": ({"bios_vendor": "Amazon EC2"}, "aws"),
    # Xen generation: "Xen" vendor, the BIOS version names amazon, the UUID starts with ec2
    "aws-xen": (
        {
            "sys_vendor": "Xen",
            "product_name": "HVM domU",
            "bios_version": "4.2.amazon",
            "product_uuid": "EC2E1916-9099-7CAF-FD21-012345ABCDEF",
        },
        "aws",
    ),
    "aws-xen-bios-version": ({"sys_vendor": "Xen", "product_name": "HVM domU", "bios_version": "4.11.amazon"}, "aws"),
    "aws-uuid-upper": ({"product_uuid": "EC2E1916-9099-7CAF-FD21-012345ABCDEF"}, "aws"),
    "aws-uuid-lower": ({"product_uuid": "ec2e1916-9099-7caf-fd21-012345abcdef"}, "aws"),
    "gcp-product": ({"sys_vendor": "Google", "product_name": "Google Compute Engine"}, "gcp"),
    "gcp-product-google": ({"product_name": "Google"}, "gcp"),
    "gcp-board-vendor": ({"board_vendor": "Google"}, "gcp"),
    "gcp-serial": ({"product_serial": "GoogleCloud-6A1B2C3D4E5F60718293A4B5C6D7E8F9"}, "gcp"),
    "alibaba-sys-vendor": ({"sys_vendor": "Alibaba Cloud", "product_name": "Alibaba Cloud ECS"}, "alibaba"),
    "alibaba-product": ({"product_name": "Alibaba Cloud ECS"}, "alibaba"),
    "ibmcloud": ({"sys_vendor": "QEMU", "chassis_vendor": "IBM:Cloud Compute Server 1.0:Nitro"}, "ibmcloud"),
    "ibmcloud-other-version": ({"chassis_vendor": "IBM:Cloud Compute Server 2.0"}, "ibmcloud"),
    # Nova's defaults, RDO's product name, and the asset tags of public OpenStack clouds
    "openstack-nova": (
        {"sys_vendor": "OpenStack Foundation", "product_name": "OpenStack Nova", "product_version": "29.0.1"},
        "openstack",
    ),
    "openstack-rdo": ({"sys_vendor": "Red Hat", "product_name": "OpenStack Compute"}, "openstack"),
    "openstack-asset-tag-nova": ({"product_name": "KVM", "chassis_asset_tag": "OpenStack Nova"}, "openstack"),
    "openstack-asset-tag-compute": ({"chassis_asset_tag": "OpenStack Compute"}, "openstack"),
    "openstack-otc": ({"sys_vendor": "QEMU", "chassis_asset_tag": "OpenTelekomCloud"}, "openstack"),
    "openstack-sap-ccloud": ({"sys_vendor": "VMware, Inc.", "chassis_asset_tag": "SAP CCloud VM"}, "openstack"),
    "openstack-huawei": (
        {"sys_vendor": "OpenStack Foundation", "product_name": "OpenStack Nova", "chassis_asset_tag": "HUAWEICLOUD"},
        "openstack",
    ),
    "openstack-samsung": ({"chassis_asset_tag": "Samsung Cloud Platform"}, "openstack"),
    # a cloud with anchors of its own wins over Nova's strings it may have kept
    "alibaba-over-nova-strings": ({"sys_vendor": "Alibaba Cloud", "product_name": "OpenStack Nova"}, "alibaba"),
    "ibmcloud-over-nova-strings": (
        {"chassis_vendor": "IBM:Cloud Compute Server 1.0", "product_name": "OpenStack Nova"},
        "ibmcloud",
    ),
    # libvirt / byom: only a cidata disk can carry user-data
    "qemu-q35": ({"sys_vendor": "QEMU", "product_name": "Standard PC (Q35 + ICH9, 2009)"}, "cidata"),
    "qemu-i440fx": ({"sys_vendor": "QEMU", "product_name": "Standard PC (i440FX + PIIX, 1996)"}, "cidata"),
    "no-dmi": ({}, "cidata"),  # s390x, containers
    # near misses
    "hyper-v-not-azure": ({"sys_vendor": "Microsoft Corporation", "product_name": "Surface Laptop"}, "cidata"),
    "ibm-not-vpc": ({"chassis_vendor": "IBM"}, "cidata"),
    "uuid-without-ec2-prefix": ({"product_uuid": "4a1e2f3c-5b6d-4e7f-8a9b-0c1d2e3f4a5b"}, "cidata"),
    # exact strings, as ds-identify compares them
    "openstack-vendor-only": ({"sys_vendor": "OpenStack Foundation", "product_name": "Standard PC"}, "cidata"),
    "openstack-product-prefix": ({"product_name": "OpenStack Nova Compute"}, "cidata"),
    "openstack-asset-tag-case": ({"chassis_asset_tag": "huaweicloud"}, "cidata"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_detect(case: str) -> None:
    dmi, expected = CASES[case]
    assert clouds.detect(Facts(dmi)) == expected


@pytest.mark.parametrize(
    "case", ["azure-full", "aws-nitro", "gcp-product", "alibaba-sys-vendor", "ibmcloud", "openstack-nova"]
)
def test_cidata_seed_wins_over_dmi(case: str) -> None:
    # byom and the docker provider put user-data at /media/cidata/user-data on any hardware
    assert clouds.detect(Facts(CASES[case][0], cidata_seed=True)) == "cidata"


def test_read_facts_from_a_root(tmp_path: Path) -> None:
    caa.make_root(str(tmp_path), caa.AZURE_DMI)  # values written with a trailing newline
    facts = clouds.read_facts(str(tmp_path), Config())
    assert facts.dmi == caa.AZURE_DMI
    assert not facts.cidata_seed
    assert clouds.detect(facts) == "azure"


def test_read_facts_tolerates_missing_and_unreadable_files(tmp_path: Path) -> None:
    caa.make_root(str(tmp_path), {"sys_vendor": "  Amazon EC2  ", "product_name": "c7i.large"})
    # an unreadable entry (root-only product_serial for a normal user): a directory fails open() for root too
    os.mkdir(tmp_path / "sys/class/dmi/id/product_serial")
    facts = clouds.read_facts(str(tmp_path), Config())
    assert facts.dmi == {"sys_vendor": "Amazon EC2", "product_name": "c7i.large"}
    assert facts.get("chassis_asset_tag") == ""
    assert clouds.detect(facts) == "aws"


def test_read_facts_without_any_dmi(tmp_path: Path) -> None:
    facts = clouds.read_facts(str(tmp_path), Config())
    assert (facts.dmi, facts.cidata_seed) == ({}, False)
    assert clouds.detect(facts) == "cidata"


def test_read_facts_non_utf8_value(tmp_path: Path) -> None:
    d = tmp_path / "sys/class/dmi/id"
    d.mkdir(parents=True)
    (d / "product_name").write_bytes(b"Caf\xe9 Board\n")
    assert clouds.read_facts(str(tmp_path), Config()).get("product_name") == "Caf\ufffd Board"


def test_read_facts_sees_the_cidata_seed(tmp_path: Path) -> None:
    caa.make_root(str(tmp_path), caa.AZURE_DMI)
    seed = tmp_path / "media/cidata"
    seed.mkdir(parents=True)
    (seed / "user-data").write_bytes(b"#cloud-config\n")
    facts = clouds.read_facts(str(tmp_path), Config())
    assert facts.cidata_seed
    assert clouds.detect(facts) == "cidata"


def test_read_facts_seed_follows_the_configured_mount_dir(tmp_path: Path) -> None:
    seed = tmp_path / "srv/seed"
    seed.mkdir(parents=True)
    (seed / "user-data").write_bytes(b"#cloud-config\n")
    cfg = Config()
    assert not clouds.read_facts(str(tmp_path), cfg).cidata_seed
    cfg = dataclasses.replace(cfg, cidata=dataclasses.replace(cfg.cidata, mount_dir="/srv/seed"))
    assert clouds.read_facts(str(tmp_path), cfg).cidata_seed


def test_a_seed_directory_is_not_a_seed(tmp_path: Path) -> None:
    (tmp_path / "media/cidata/user-data").mkdir(parents=True)
    assert not clouds.read_facts(str(tmp_path), Config()).cidata_seed


@pytest.mark.parametrize(
    ("provider", "address"),
    [
        ("azure", "169.254.169.254"),
        ("aws", "169.254.169.254"),
        ("gcp", "169.254.169.254"),
        ("alibaba", "100.100.100.200"),
        ("ibmcloud", "169.254.169.254"),
        ("cidata", None),
    ],
)
def test_metadata_address(provider: str, address: str | None) -> None:
    assert clouds.metadata_address(provider, Config()) == address


# /proc/sysinfo as Linux prints it on s390x (arch/s390/kernel/sysinfo.c: "Name:" padded to a
# column, values padded to their field width).  Machine and LPAR levels, then the guest's own
# hypervisor level (VM00), which a KVM host fills in as "KVM/Linux".
SYSINFO_MACHINE = (
    "Manufacturer:         IBM             \n"
    "Type:                 3931\n"
    "Model:                701              A01             \n"
    "Sequence Code:        00000000000C0DE1\n"
    "\n"
    "LPAR Number:          21\n"
    "LPAR Characteristics: Shared \n"
    "LPAR Name:            LP21    \n"
)
SYSINFO_KVM = "\nVM00 Name:            KVMguest\nVM00 Control Program: KVM/Linux       \nVM00 Adjustment:      1000\n"
SYSINFO_ZVM = "\nVM00 Name:            LINUX01 \nVM00 Control Program: z/VM    7.3.0   \nVM00 Adjustment:      1000\n"

SYSINFO_CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    # IBM Cloud VPC (LinuxONE, Secure Execution), CAA's libvirt provider on an s390x host, any KVM on
    # IBM Z: the same lines, so IBM Cloud is a candidate that cannot be detected
    "kvm-guest-on-ibm-z": (SYSINFO_MACHINE + SYSINFO_KVM, ("ibmcloud",)),
    # KVM inside a z/VM guest: VM00 is the guest's own level (KVM), VM01 the z/VM below it
    "kvm-guest-in-zvm": (
        SYSINFO_MACHINE + SYSINFO_KVM + "\nVM01 Name:            LINUX01 \nVM01 Control Program: z/VM    7.3.0   \n",
        ("ibmcloud",),
    ),
    # near misses: no cloud runs these
    "zvm-guest": (SYSINFO_MACHINE + SYSINFO_ZVM, ()),
    "lpar": (SYSINFO_MACHINE, ()),
    "qemu-tcg": (SYSINFO_MACHINE.replace("IBM ", "QEMU") + SYSINFO_KVM, ()),  # an emulated s390x
    "not-s390x": ("", ()),
}


def s390x_root(tmp_path: Path, sysinfo: str) -> Path:
    """A guest root as on s390x: /proc/sysinfo, no /sys/class/dmi."""
    if sysinfo:
        (tmp_path / "proc").mkdir(parents=True, exist_ok=True)
        (tmp_path / "proc/sysinfo").write_text(sysinfo)
    return tmp_path


@pytest.mark.parametrize("case", sorted(SYSINFO_CASES))
def test_no_cloud_is_detected_from_sysinfo(tmp_path: Path, case: str) -> None:
    """IBM Z has no DMI and /proc/sysinfo names no cloud: `auto` stays with cidata, and names the
    clouds it cannot tell apart (boot.run warns that the image must configure one)."""
    text, undetectable = SYSINFO_CASES[case]
    facts = clouds.read_facts(str(s390x_root(tmp_path, text)), Config())
    assert clouds.detect(facts) == "cidata"
    assert clouds.undetectable(facts) == undetectable


def test_sysinfo_keeps_only_the_fields_the_rules_read(tmp_path: Path) -> None:
    facts = clouds.read_facts(str(s390x_root(tmp_path, SYSINFO_MACHINE + SYSINFO_KVM)), Config())
    assert facts.sysinfo == {"Manufacturer": "IBM", "Type": "3931", "VM00 Control Program": "KVM/Linux"}


def test_sysinfo_is_not_read_where_there_is_dmi(tmp_path: Path) -> None:
    caa.make_root(str(tmp_path), {"sys_vendor": "QEMU"})
    facts = clouds.read_facts(str(s390x_root(tmp_path, SYSINFO_MACHINE + SYSINFO_KVM)), Config())
    assert facts.sysinfo == {}
    assert clouds.undetectable(facts) == ()


def test_a_cidata_seed_leaves_nothing_undetected(tmp_path: Path) -> None:
    # byom: CAA delivered the user-data; which cloud it is does not matter
    facts = Facts({}, cidata_seed=True, sysinfo={"Manufacturer": "IBM", "VM00 Control Program": "KVM/Linux"})
    assert clouds.undetectable(facts) == ()


@pytest.mark.parametrize(
    "text",
    [
        "Manufacturer: IBM\n" * 100_000,  # larger than the read bound: a repeated name keeps its first value
        "Manufacturer:" + "I" * 10_000 + "\nVM00 Control Program: KVM/Linux\n",  # a value past 256 chars
        "\x00\xff\ufffd:\n::::\nManufacturer\nVM00 Control Program KVM/Linux\n",  # no usable line
    ],
)
def test_sysinfo_is_read_bounded_and_never_fails(tmp_path: Path, text: str) -> None:
    facts = clouds.read_facts(str(s390x_root(tmp_path, text)), Config())
    assert all(len(v) <= 256 for v in facts.sysinfo.values())
    assert clouds.undetectable(facts) == ()
    assert clouds.detect(facts) == "cidata"
