"""The boot path's measurement against a real swtpm: PCR 8 extended once per boot, checked with
tpm2-tools; a rerun of the agent in the same boot does not extend again."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from guest_agent import cli, tpm
from guest_agent.errors import EXIT_CONFIG, EXIT_OK, EXIT_UNAVAILABLE
from guest_agent.initdata import expected_pcr
from tests import caa
from tests.conftest import snapshot
from tests.swtpm import Swtpm, needs_swtpm

ZERO32 = bytes(32)


def setup_root(tmp_path: Path, swtpm: Swtpm, toml: bytes) -> tuple[Path, Path, Path]:
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    (root / "dev/tpmrm0").symlink_to(swtpm.sock)  # --root: the agent opens <root>/dev/tpmrm0
    ud = tmp_path / "user-data"
    ud.write_bytes(caa.cloud_config(initdata=toml))
    conf = tmp_path / "c.toml"
    conf.write_text("[tpm]\nenabled = true\n")
    return root, ud, conf


@needs_swtpm
def test_provision_extends_pcr8_once(tmp_path: Path, swtpm: Swtpm, capsys: pytest.CaptureFixture[str]) -> None:
    toml = caa.initdata_toml("sha384")
    root, ud, conf = setup_root(tmp_path, swtpm, toml)
    argv = ["provision", "--root", str(root), "--user-data", str(ud), "--config", str(conf)]
    assert cli.main(argv) == EXIT_OK
    assert cli.main(argv) == EXIT_OK  # the unit restarted in the same boot: no second extend
    digest = hashlib.sha384(toml).digest()
    assert swtpm.pcrread(8) == expected_pcr(ZERO32, digest[:32])
    assert (root / "run/guest-agent/pcr8.extended").read_text() == digest.hex()
    err = capsys.readouterr().err
    assert "PCR 8: extended" in err and "PCR 8: already" in err


@needs_swtpm
def test_other_initdata_in_the_same_boot_is_refused(tmp_path: Path, swtpm: Swtpm) -> None:
    root, ud, conf = setup_root(tmp_path, swtpm, caa.initdata_toml("sha256"))
    argv = ["provision", "--root", str(root), "--user-data", str(ud), "--config", str(conf)]
    assert cli.main(argv) == EXIT_OK
    before = snapshot(root / "run/peerpod")
    ud.write_bytes(caa.cloud_config(initdata=caa.initdata_toml("sha512")))
    assert cli.main(argv) == EXIT_CONFIG  # the PCR already holds another measurement ...
    assert snapshot(root / "run/peerpod") == before  # ... so nothing was rewritten under it


@needs_swtpm
def test_an_announced_tpm_whose_device_comes_late_is_still_extended(tmp_path: Path, swtpm: Swtpm) -> None:
    """The firmware's ACPI TPM2 table is there, the device node comes while the agent waits (a
    driver udev loads late): the agent waits for it and extends, instead of skipping the measure."""
    table = tmp_path / "root" / tpm.ACPI_TPM2_TABLE.lstrip("/")
    table.parent.mkdir(parents=True)
    table.write_bytes(b"TPM2")
    provision_with_a_late_device(tmp_path, swtpm, "[tpm]\nenabled = true\n")


def provision_with_a_late_device(tmp_path: Path, swtpm: Swtpm, conf_text: str) -> None:
    """`provision` with the device node appearing 0.3 s after the agent started: it must wait for it
    and extend PCR 8 once."""
    toml = caa.initdata_toml("sha256")
    root, ud, conf = setup_root(tmp_path, swtpm, toml)
    conf.write_text(conf_text)
    node = root / "dev/tpmrm0"
    node.unlink()
    timer = threading.Timer(0.3, lambda: node.symlink_to(swtpm.sock))
    timer.start()
    try:
        argv = ["provision", "--root", str(root), "--user-data", str(ud), "--config", str(conf)]
        assert cli.main(argv) == EXIT_OK
    finally:
        timer.join()
    assert swtpm.pcrread(8) == expected_pcr(ZERO32, hashlib.sha256(toml).digest()[:32])


def provision_without_tpm(tmp_path: Path, tpm_conf: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """`provision` in a root without a TPM device and without an ACPI TPM2 table (s390x, a VM size
    without a vTPM, a device-tree machine)."""
    root = tmp_path / "root"
    (root / "dev").mkdir(parents=True)
    ud = tmp_path / "user-data"
    ud.write_bytes(caa.cloud_config())
    conf = tmp_path / "c.toml"
    conf.write_text("[tpm]\n" + tpm_conf)
    rc = cli.main(["provision", "--root", str(root), "--user-data", str(ud), "--config", str(conf)])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize(("absent", "level"), [("info", "info"), ("warning", "warning")])
def test_a_missing_tpm_is_logged_at_the_configured_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], absent: str, level: str
) -> None:
    rc, err = provision_without_tpm(tmp_path, f'absent = "{absent}"\ndevice_wait_s = 5.0\n', capsys)
    assert rc == EXIT_OK  # provisioned, initdata not measured: no wait without an announcement
    assert f"{level}: no TPM at /dev/tpmrm0: initdata not measured into a PCR" in err
    assert "PCR 8: absent" in err


def test_a_required_tpm_that_is_missing_fails_with_69(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = provision_without_tpm(tmp_path, 'absent = "error"\ndevice_wait_s = 0.2\n', capsys)
    assert rc == EXIT_UNAVAILABLE  # the unit retries; on Azure the fabric hears NotReady
    assert "error: no TPM device, and the configuration requires one" in err
    assert "waiting up to 0.2 s" in err
    assert not (tmp_path / "root/run/guest-agent/pcr8.extended").exists()


@needs_swtpm
def test_a_required_tpm_whose_device_comes_late_is_extended(tmp_path: Path, swtpm: Swtpm) -> None:
    """No ACPI table (s390x has no ACPI, device-tree machines neither): `absent = "error"` makes the
    agent wait for the device the image says it has, as an announcement would."""
    provision_with_a_late_device(tmp_path, swtpm, '[tpm]\nabsent = "error"\n')
