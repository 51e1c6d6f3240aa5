"""Failures before the boot path starts still reach the Azure fabric."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from guest_agent import boot
from guest_agent.config import Config
from guest_agent.errors import EXIT_CONFIG, ConfigError
from tests import caa
from tests.fakecloud.wireserver import FakeWireserver


def test_config_error_is_reported_as_not_ready(tmp_path: Path) -> None:
    caa.make_root(str(tmp_path), caa.AZURE_DMI)
    with FakeWireserver() as ws:
        cfg = Config()
        cfg = dataclasses.replace(cfg, azure=dataclasses.replace(cfg.azure, wireserver_url=ws.url))
        err = ConfigError("unknown key in agent configuration", key="fetch.deadline")
        assert boot.fail_early(err, cfg, str(tmp_path)) == EXIT_CONFIG
        reports = ws.accepted()
    assert [r.state for r in reports] == ["NotReady"]
    assert "unknown key in agent configuration" in (reports[0].description or "")
    assert not (tmp_path / "run/peerpod").exists()


def test_config_error_off_azure_reports_nothing(tmp_path: Path) -> None:
    caa.make_root(str(tmp_path), {"sys_vendor": "Amazon EC2"})
    with FakeWireserver() as ws:
        cfg = Config()
        cfg = dataclasses.replace(cfg, azure=dataclasses.replace(cfg.azure, wireserver_url=ws.url))
        assert boot.fail_early(ConfigError("bad"), cfg, str(tmp_path)) == EXIT_CONFIG
        assert ws.server.requests == []
