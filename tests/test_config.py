"""Layered TOML configuration: defaults, /etc file, sorted drop-ins, --config; strict keys and types."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_agent import config
from guest_agent.errors import ConfigError


def write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_defaults_document_the_allow_list() -> None:
    cfg = config.load("/nonexistent-root")
    assert cfg.provider == "auto"
    assert "/run/peerpod/apf.json" in cfg.files.allowed_paths
    assert cfg.fetch.deadline_s == 180.0
    assert cfg.files.default_mode == 0o600


def test_layers_apply_in_order(tmp_path: Path) -> None:
    write(tmp_path / "etc/guest-agent/config.toml", 'provider = "aws"\n[fetch]\ndeadline_s = 10\n')
    write(tmp_path / "etc/guest-agent/config.d/20-b.toml", "[fetch]\ndeadline_s = 30\n")
    write(tmp_path / "etc/guest-agent/config.d/10-a.toml", "[fetch]\ndeadline_s = 20\nconnect_timeout_s = 0.5\n")
    write(tmp_path / "etc/guest-agent/config.d/README", "not toml, ignored")
    extra = write(tmp_path / "extra.toml", '[aws]\nimds_url = "http://127.0.0.1:1"\n')
    cfg = config.load(str(tmp_path), str(extra))
    assert cfg.provider == "aws"
    assert cfg.fetch.deadline_s == 30.0  # 20-b.toml sorts after 10-a.toml
    assert cfg.fetch.connect_timeout_s == 0.5
    assert cfg.aws.imds_url == "http://127.0.0.1:1"
    assert cfg.azure.imds_url == "http://169.254.169.254"  # untouched sections keep defaults


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[fetch]\ndeadline = 3\n", "unknown key"),
        ("[nosuch]\nx = 1\n", "unknown key"),
        ('provider = "openstack"\n', "unknown provider"),
        ('[fetch]\ndeadline_s = "3"\n', "wrong type"),
        ("[network]\nwait = 1\n", "wrong type"),
        ("[files]\nallowed_paths = [1]\n", "list of strings"),
        ("fetch = 3\n", "must be a table"),
        ("[fetch\n", "not TOML"),
    ],
)
def test_bad_config_is_an_error(tmp_path: Path, text: str, fragment: str) -> None:
    f = write(tmp_path / "c.toml", text)
    with pytest.raises(ConfigError, match=fragment):
        config.load(str(tmp_path), str(f))
