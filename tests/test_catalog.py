"""The journald catalog: one entry per MESSAGE_ID the agent logs, compiled by journalctl itself
from a `make install` tree, and every @FIELD@ it substitutes is a field the agent sends."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from guest_agent import log as agent_log
from tests.test_units import install

REPO = Path(__file__).resolve().parents[1]
CATALOG = REPO / "catalog" / "guest-agent.catalog"
IDS = {v for k, v in vars(agent_log).items() if k.startswith("MSG_")}


def entries() -> dict[str, str]:
    """message id -> entry text (header lines and body), parsed as journalctl's catalog reader does."""
    out: dict[str, str] = {}
    current = None
    for line in CATALOG.read_text().splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"-- ([0-9a-f]{32})", line)
        if m:
            current = m.group(1)
            out[current] = ""
        elif current is not None:
            out[current] += line + "\n"
    return out


def test_one_entry_per_message_id() -> None:
    assert set(entries()) == IDS


def test_every_message_id_is_logged() -> None:
    """No MESSAGE_ID is defined and never used (the catalog would explain an entry never sent)."""
    source = "\n".join(p.read_text() for p in (REPO / "guest_agent").rglob("*.py") if p.name != "log.py")
    for name, value in vars(agent_log).items():
        if name.startswith("MSG_"):
            assert re.search(rf"\b{name}\b", source), f"{name} ({value}) is never logged"


def test_entries_have_subject_documentation_and_a_body() -> None:
    for msg_id, text in entries().items():
        head, _, body = text.strip("\n").partition("\n\n")
        assert re.search(r"^Subject: \S", head, re.M), msg_id
        assert "Documentation: man:guest-agent(8)" in head, msg_id
        assert body.strip(), msg_id


def test_substituted_fields_are_fields_the_agent_sends() -> None:
    source = "\n".join(p.read_text() for p in (REPO / "guest_agent").rglob("*.py"))
    sent = {f"GUEST_AGENT_{k.upper()}" for k in re.findall(r"\b(\w+)=", source)} | {"GUEST_AGENT_PROVIDER"}
    for text in entries().values():
        for name in re.findall(r"@(\w+)@", text):
            assert name in sent, name


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="no journalctl")
def test_journalctl_compiles_the_installed_catalog(tmp_path: Path) -> None:
    install(tmp_path, "PREFIX=/usr")
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True, timeout=30)
    assert (tmp_path / "var/lib/systemd/catalog/database").is_file()
    listed = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--list-catalog"], check=True, timeout=30, capture_output=True, text=True
    ).stdout
    assert {line.split()[0] for line in listed.splitlines()} == IDS
    dump = subprocess.run(
        ["journalctl", f"--root={tmp_path}", "--dump-catalog", agent_log.MSG_FAILED],
        check=True,
        timeout=30,
        capture_output=True,
        text=True,
    ).stdout
    assert "Subject: Pod VM provisioning failed: @GUEST_AGENT_REASON@" in dump
