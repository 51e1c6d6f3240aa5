"""IBM Z (s390x, IBM Secure Execution): no DMI, no TPM.  `auto` cannot tell IBM Cloud from other KVM
hosts, so it uses cidata and says so; an s390x image for IBM Cloud configures its provider (and
its TPM) in /etc/guest-agent/config.d/, and then gets the IBM metadata service and its address for
the pod's IMDS NAT.  Runs the real agent against a root with a fake /proc/sysinfo."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_agent import cli, clouds, config
from guest_agent.errors import EXIT_OK, EXIT_UNAVAILABLE
from tests import caa
from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Script
from tests.test_detect import SYSINFO_KVM, SYSINFO_MACHINE, s390x_root

# What docs/adding-a-cloud.md tells an s390x image for IBM Cloud VPC to ship.
IMAGE_CONFIG = 'provider = "ibmcloud"\n[tpm]\nenabled = false\n'


def run(root: Path, conf: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    c = root.parent / "test.toml"
    c.write_text(conf)
    rc = cli.main(["run", "--root", str(root), "--config", str(c)])
    return rc, capsys.readouterr().err


def test_auto_on_ibm_z_uses_cidata_and_says_what_to_configure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = s390x_root(tmp_path / "root", SYSINFO_MACHINE + SYSINFO_KVM)
    rc, err = run(root, "[cidata]\nwait_s = 0.0\n[fetch]\ndeadline_s = 1.0\n[netns]\nenabled = false\n", capsys)
    assert rc == EXIT_UNAVAILABLE  # no cidata disk in this root
    assert "provider cidata (detected from DMI)" in err
    assert "cannot tell ibmcloud from other hosts: using cidata" in err
    assert 'provider in /etc/guest-agent/config.d/ ("ibmcloud" on that cloud, "cidata" elsewhere)' in err


def test_an_s390x_image_configured_for_ibm_cloud_fetches_from_its_metadata_service(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = s390x_root(tmp_path / "root", SYSINFO_MACHINE + SYSINFO_KVM)
    (root / "etc/guest-agent/config.d").mkdir(parents=True)
    (root / "etc/guest-agent/config.d/50-ibmcloud.toml").write_text(IMAGE_CONFIG)
    cfg = config.load(str(root))
    assert (cfg.provider, cfg.tpm.enabled) == ("ibmcloud", False)
    # the pod's IMDS NAT (guest-agent netns imds-nat) forwards to IBM's metadata address, not nowhere
    assert clouds.metadata_address(cfg.provider, cfg) == "169.254.169.254"
    with FakeServer("imds", imds.ibmcloud(caa.cloud_config(), Script())) as srv:
        rc, err = run(root, f'[ibmcloud]\nmetadata_url = "{srv.url}"\n[netns]\nenabled = false\n', capsys)
        paths = [r.path for r in srv.requests]
    assert rc == EXIT_OK, err
    assert paths == ["/instance_identity/v1/token", "/metadata/v1/instance/initialization"]
    assert "provider ibmcloud (configured)" in err and "cannot tell" not in err
    assert "PCR 8: disabled" in err
    assert (root / "run/peerpod/apf.json").is_file()
