"""guest-agent(8): renders without groff warnings from a `make install` tree, and lists what the
code defines: every exit code, every command, the config paths."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from guest_agent import __version__, cli, config
from guest_agent.errors import EXIT_CODES
from tests.test_units import install

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "man" / "guest-agent.8"


def rendered(page: Path) -> str:
    env = {**os.environ, "MANWIDTH": "200", "MAN_KEEP_FORMATTING": "0"}
    out = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True, timeout=60, env=env, check=True)
    return re.sub(r".\x08", "", out.stdout)  # overstrike bold/underline, if any


@pytest.mark.skipif(shutil.which("groff") is None, reason="no groff")
def test_no_groff_warnings() -> None:
    proc = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(SOURCE)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.skipif(shutil.which("man") is None, reason="no man")
def test_installed_page_renders_with_the_version(tmp_path: Path) -> None:
    install(tmp_path, "PREFIX=/usr")
    text = rendered(tmp_path / "usr/share/man/man8/guest-agent.8")
    assert f"guest-agent {__version__}" in text
    assert "@VERSION@" not in text


def test_page_lists_exit_codes_commands_and_config_paths() -> None:
    src = SOURCE.read_text()
    section = src.split(".SH EXIT STATUS", 1)[1].split(".SH ", 1)[0]
    assert [int(c) for c in re.findall(r"^\.B (\d+)$", section, re.M)] == list(EXIT_CODES)
    assert config.SYSTEM_CONFIG in src and config.SYSTEM_CONFIG_DIR + "/*.toml" in src
    parser = cli._parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name in sub.choices:  # type: ignore[union-attr]
        assert re.search(rf"^\.B[IR]* \"?{re.escape(name)}\b", src, re.M), name
