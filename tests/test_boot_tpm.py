"""The boot path's measurement against a real swtpm: PCR 8 extended once per boot, checked with
tpm2-tools; a rerun of the agent in the same boot does not extend again."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from guest_agent import cli, tpm
from guest_agent.errors import EXIT_CONFIG, EXIT_OK
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
    toml = caa.initdata_toml("sha256")
    root, ud, conf = setup_root(tmp_path, swtpm, toml)
    node = root / "dev/tpmrm0"
    node.unlink()
    table = root / tpm.ACPI_TPM2_TABLE.lstrip("/")
    table.parent.mkdir(parents=True)
    table.write_bytes(b"TPM2")
    timer = threading.Timer(0.3, lambda: node.symlink_to(swtpm.sock))
    timer.start()
    try:
        argv = ["provision", "--root", str(root), "--user-data", str(ud), "--config", str(conf)]
        assert cli.main(argv) == EXIT_OK
    finally:
        timer.join()
    assert swtpm.pcrread(8) == expected_pcr(ZERO32, hashlib.sha256(toml).digest()[:32])
