"""Failures before the boot path starts still reach the Azure fabric."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from guest_agent import boot, cli
from guest_agent.azure import kvp
from guest_agent.config import Config
from guest_agent.errors import EXIT_CANTCREAT, EXIT_CONFIG, EXIT_UNAVAILABLE, ConfigError
from tests import caa
from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Script
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


def _azure_root(tmp_path: Path, imds_url: str, ws_url: str, extra: str = "") -> tuple[Path, Path]:
    root = tmp_path / "root"
    caa.make_root(str(root), caa.AZURE_DMI)
    conf = tmp_path / "c.toml"
    conf.write_text(
        f'[azure]\nimds_url = "{imds_url}"\nwireserver_url = "{ws_url}"\nfailure_deadline_s = 10.0\n'
        f"[netns]\nenabled = false\n[tpm]\nenabled = false\n{extra}"
    )
    return root, conf


def closed_port() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connection refused
    return f"http://127.0.0.1:{port}"


def test_metadata_unreachable_reports_not_ready(tmp_path: Path) -> None:
    with FakeWireserver() as ws:
        root, conf = _azure_root(tmp_path, closed_port(), ws.url, "[fetch]\ndeadline_s = 1.0\n")
        assert cli.main(["run", "--root", str(root), "--config", str(conf)]) == EXIT_UNAVAILABLE
        reports = ws.accepted()
    assert [r.state for r in reports] == ["NotReady"]
    assert "fetching user-data (azure) failed until the deadline" in (reports[0].description or "")
    assert not (root / "run/peerpod").exists()


def test_write_error_reports_not_ready(tmp_path: Path) -> None:
    with FakeWireserver() as ws, FakeServer("imds", imds.azure(caa.cloud_config(), Script())) as srv:
        root, conf = _azure_root(tmp_path, srv.url, ws.url)
        (root / "run/peerpod").mkdir(parents=True)
        (root / "run/peerpod/auth.json").symlink_to("/etc/shadow")  # planted by an attacker
        assert cli.main(["run", "--root", str(root), "--config", str(conf)]) == EXIT_CANTCREAT
        reports = ws.accepted()
    assert [r.state for r in reports] == ["NotReady"]
    assert "symlink" in (reports[0].description or "")
    assert sorted(p.name for p in (root / "run/peerpod").iterdir()) == ["auth.json"]


def test_a_required_tpm_that_is_missing_reports_not_ready(tmp_path: Path) -> None:
    with FakeWireserver() as ws, FakeServer("imds", imds.azure(caa.cloud_config(), Script())) as srv:
        root, conf = _azure_root(tmp_path, srv.url, ws.url)
        (root / "dev").mkdir()  # no tpmrm0 in it, no ACPI TPM2 table
        conf.write_text(
            conf.read_text().replace("[tpm]\nenabled = false\n", '[tpm]\nabsent = "error"\ndevice_wait_s = 0.1\n')
        )
        assert cli.main(["run", "--root", str(root), "--config", str(conf)]) == EXIT_UNAVAILABLE
        reports = ws.accepted()
    assert [r.state for r in reports] == ["NotReady"]
    assert "no TPM device, and the configuration requires one" in (reports[0].description or "")


def test_report_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with FakeWireserver() as ws:
        root, conf = _azure_root(tmp_path, closed_port(), ws.url)
        assert cli.main(["report-failure", "--root", str(root), "--config", str(conf), "--reason", "disk full"]) == 0
        # Never Ready after NotReady in one boot, not even by hand ...
        assert cli.main(["report-ready", "--root", str(root), "--config", str(conf)]) == EXIT_UNAVAILABLE
        # ... unless the operator insists.
        assert cli.main(["report-ready", "--force", "--root", str(root), "--config", str(conf)]) == 0
        reports = ws.accepted()
    assert [r.state for r in reports] == ["NotReady", "Ready"]
    assert kvp.parse_provisioning_report(reports[0].description or "")["reason"] == "disk full"
    out = capsys.readouterr().out
    assert "acknowledged: NotReady" in out and "acknowledged: Ready" in out


def test_report_command_without_a_wireserver_exits_69(tmp_path: Path) -> None:
    root, conf = _azure_root(tmp_path, closed_port(), closed_port(), "")
    conf.write_text(conf.read_text().replace("failure_deadline_s = 10.0", "failure_deadline_s = 1.0"))
    assert cli.main(["report-failure", "--root", str(root), "--config", str(conf), "--reason", "x"]) == EXIT_UNAVAILABLE


def test_a_second_run_after_not_ready_never_reports_ready(tmp_path: Path) -> None:
    """Restart semantics: run 1 fails (bad user-data, exit 78) and reports NotReady; run 2 in the
    same boot (same /run) provisions fine, exits 0 (its exit status reflects provisioning only),
    and does not report Ready."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    with FakeWireserver() as ws:
        runs = []
        for user_data in (b"%% not base64", caa.cloud_config()):
            with FakeServer("imds", imds.azure(user_data, Script())) as srv:
                root, conf = _azure_root(tmp_path, srv.url, ws.url)
                (root / "var/lib/hyperv").mkdir(parents=True, exist_ok=True)
                argv = [sys.executable, "-m", "guest_agent", "run", "--root", str(root), "--config", str(conf)]
                runs.append(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120))
        reports = ws.accepted()
    assert [r.returncode for r in runs] == [EXIT_CONFIG, 0], runs[1].stderr[-2000:]
    assert [r.state for r in reports] == ["NotReady"]
    assert "NotReady was already reported in this boot: never Ready after it" in runs[1].stderr
    assert (root / "run/peerpod/apf.json").exists()
    pool = (root / "var/lib/hyperv/.kvp_pool_1").read_bytes()
    assert [kvp.parse_provisioning_report(v)["result"] for _, v in kvp.decode_records(pool)] == ["error"]


def _stage_names(root: Path) -> list[str]:
    import json

    doc = json.loads((root / "run/guest-agent/timeline.json").read_bytes())
    return [s["name"] for s in doc["stages"]]


def test_timeline_holds_the_fabric_report(tmp_path: Path) -> None:
    """The timeline is rewritten after the report, so it shows the report's stage too."""
    with FakeWireserver() as ws, FakeServer("imds", imds.azure(caa.cloud_config(), Script())) as srv:
        root, conf = _azure_root(tmp_path / "ok", srv.url, ws.url)
        assert cli.main(["run", "--root", str(root), "--config", str(conf)]) == 0
    assert _stage_names(root)[-1] == "report-ready"
    with FakeWireserver() as ws:
        root, conf = _azure_root(tmp_path / "bad", closed_port(), ws.url, "[fetch]\ndeadline_s = 1.0\n")
        assert cli.main(["run", "--root", str(root), "--config", str(conf)]) == EXIT_UNAVAILABLE
    assert _stage_names(root)[-1] == "report-failure"


def test_an_unacknowledged_ready_exits_0_and_says_so(tmp_path: Path) -> None:
    """After READY=1 the exit status reflects provisioning only; STATUS= names the failed report."""
    from guest_agent import config
    from guest_agent.notify import Notifier

    sent: list[str] = []
    with FakeWireserver() as ws, FakeServer("imds", imds.azure(caa.cloud_config(), Script())) as srv:
        root, conf = _azure_root(tmp_path, srv.url, ws.url)
        (root / "run/guest-agent").mkdir(parents=True)
        (root / "run/guest-agent/azure-not-ready").write_text("earlier run\n")  # NotReady already sent
        cfg = config.load(str(root), str(conf))
        code = boot.run(cfg, str(root), boot.Deps(notifier=Notifier(lambda m: sent.append(m) is None)))
        assert ws.accepted() == []
    assert code == 0
    assert (root / "run/peerpod/apf.json").exists()
    assert sent[-1].startswith("STATUS=done; Ready not acknowledged:"), sent[-1]


def _journal_of(run: Callable[[dict[str, str]], int]) -> tuple[int, list[dict[str, str]]]:
    """`run(log_fields)` with the agent's log going to a journald stand-in (the native protocol on a
    real datagram socket, read as it arrives); its exit status and every entry journald would store."""
    import shutil
    import socket
    import tempfile
    import threading

    from guest_agent import log as agent_log
    from tests.test_log import parse_entry

    d = tempfile.mkdtemp(prefix="ga-journal-")  # short: AF_UNIX paths are limited to 108 bytes
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    entries: list[dict[str, str]] = []

    def receive() -> None:
        while data := sock.recv(1 << 20):  # b"": the end marker sent below
            entries.append(parse_entry(data))

    try:
        sock.bind(f"{d}/socket")
        reader = threading.Thread(target=receive, daemon=True)
        reader.start()
        log_fields = agent_log.setup(agent_log.DEBUG, journal=True, socket_path=f"{d}/socket")
        try:
            code = run(log_fields)
        finally:
            agent_log.setup(agent_log.WARNING, journal=False)
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as end:
                end.sendto(b"", f"{d}/socket")
            reader.join(timeout=30)
        return code, entries
    finally:
        sock.close()
        shutil.rmtree(d)


@pytest.mark.parametrize("wireserver", ["never-answers", "not-ready-before"])
def test_an_unacknowledged_ready_fills_every_field_of_its_catalog_entry(tmp_path: Path, wireserver: str) -> None:
    """`journalctl -x` substitutes @GUEST_AGENT_REASON@, @GUEST_AGENT_STAGE@ and
    @GUEST_AGENT_EXIT_CODE@ from the entry: a real run whose Ready the wireserver never takes (it
    accepts the connection and never answers, or NotReady was reported earlier in this boot) logs
    "Ready was not acknowledged" with all of them, as every catalogued entry of the run carries
    the fields its catalog text names."""
    from guest_agent import config
    from guest_agent.log import MSG_FAILED
    from guest_agent.notify import Notifier
    from tests.test_catalog import entries as catalog_entries

    placeholders = {msg_id: set(re.findall(r"@(\w+)@", text)) for msg_id, text in catalog_entries().items()}
    with (
        FakeWireserver(blackhole=wireserver == "never-answers") as ws,
        FakeServer("imds", imds.azure(caa.cloud_config(), Script())) as srv,
    ):
        root, conf = _azure_root(tmp_path, srv.url, ws.url)
        conf.write_text(conf.read_text().replace("[azure]\n", "[azure]\nready_deadline_s = 1.0\n"))
        if wireserver == "not-ready-before":
            (root / "run/guest-agent").mkdir(parents=True)
            (root / "run/guest-agent/azure-not-ready").write_text("earlier run\n")
        cfg = config.load(str(root), str(conf))
        notifier = Notifier(lambda m: True)
        code, journal = _journal_of(lambda f: boot.run(cfg, str(root), boot.Deps(notifier=notifier, log_fields=f)))
        assert ws.accepted() == []
    assert code == 0
    failed = [e for e in journal if e.get("MESSAGE_ID") == MSG_FAILED]
    assert [e["MESSAGE"].split(":")[0] for e in failed] == ["Ready was not acknowledged"]
    assert failed[0]["GUEST_AGENT_STAGE"] == "report-ready"
    assert failed[0]["GUEST_AGENT_EXIT_CODE"] == "0"  # the agent's exit status: provisioning succeeded
    assert failed[0]["GUEST_AGENT_REASON"] and failed[0]["GUEST_AGENT_REASON"] in failed[0]["MESSAGE"]
    catalogued = [e for e in journal if e.get("MESSAGE_ID") in placeholders]
    assert len(catalogued) >= 3  # applied, failed, timeline
    for e in catalogued:
        assert placeholders[e["MESSAGE_ID"]] <= set(e), (e["MESSAGE"], placeholders[e["MESSAGE_ID"]] - set(e))
