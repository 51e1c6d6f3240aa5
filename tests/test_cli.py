"""The command line as operators and CAA developers use it."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guest_agent import __version__, cli
from guest_agent.errors import EXIT_CONFIG, EXIT_OK
from tests import caa
from tests.conftest import snapshot


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        cli.main(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip() == f"guest-agent {__version__}"


def test_check_prints_the_plan_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ud = tmp_path / "user-data"
    toml = caa.initdata_toml("sha256")
    ud.write_bytes(caa.cloud_config(initdata=toml))
    before = snapshot(tmp_path)
    assert cli.main(["check", str(ud)]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"sha256 {hashlib.sha256(ud.read_bytes()).hexdigest()}" in out.splitlines()[0]
    assert snapshot(tmp_path) == before
    for path, content in caa.expected_files(initdata=toml).items():
        assert f"{path}" in out and hashlib.sha256(content).hexdigest() in out
    assert "/run/peerpod/policy.rego" in out and "00600" in out
    assert caa.digest(toml, "sha256") in out


def test_check_reports_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ud = tmp_path / "user-data"
    ud.write_bytes(b"#cloud-config\nruncmd: [reboot]\n")
    assert cli.main(["check", str(ud)]) == EXIT_CONFIG
    assert "runcmd" in capsys.readouterr().err


def test_provision_then_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ud = tmp_path / "user-data"
    toml = caa.initdata_toml()
    ud.write_bytes(caa.cloud_config(initdata=toml))
    root = tmp_path / "root"
    assert cli.main(["provision", "--root", str(root), "--user-data", str(ud)]) == EXIT_OK
    for path, content in caa.expected_files(initdata=toml).items():
        assert (root / path.lstrip("/")).read_bytes() == content
    assert (root / "run/peerpod/initdata.digest").read_text() == caa.digest(toml)
    capsys.readouterr()
    assert cli.main(["timeline", "--root", str(root), "--json"]) == EXIT_OK
    doc = json.loads(capsys.readouterr().out)
    assert doc["clock"] == "CLOCK_MONOTONIC"
    assert [s["name"] for s in doc["stages"]] == ["validate", "write", "measure"]
    assert all(s["ok"] and s["end"] >= s["start"] for s in doc["stages"])
    assert cli.main(["timeline", "--root", str(root)]) == EXIT_OK
    assert "validate" in capsys.readouterr().out


def test_timeline_without_a_run_is_an_error(tmp_path: Path) -> None:
    assert cli.main(["timeline", "--root", str(tmp_path)]) != EXIT_OK


def test_console_script_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "guest_agent", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("guest-agent ")


def test_config_prints_the_effective_configuration_with_origins(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomllib

    from guest_agent import config

    main = tmp_path / "etc/guest-agent/config.toml"
    main.parent.mkdir(parents=True)
    main.write_text('provider = "aws"\n[fetch]\ndeadline_s = 10\n[files]\ndefault_mode = 0o640\n')
    assert cli.main(["config", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f'provider = "aws"  # {main}\n' in out
    assert f"deadline_s = 10.0  # {main}\n" in out
    assert "default_mode = 0o640" in out
    assert "connect_timeout_s = 1.0  # default\n" in out
    # The output is itself a configuration file that loads to the same values.
    again = tmp_path / "again.toml"
    again.write_text(out)
    assert tomllib.loads(out)["fetch"]["deadline_s"] == 10.0
    reloaded = config.load(str(tmp_path / "elsewhere"), str(again))
    assert config.as_dict(reloaded) == config.as_dict(config.load(str(tmp_path)))


def test_run_with_an_invalid_value_exits_78_before_writing(tmp_path: Path) -> None:
    """[netns] name = "a/b" used to load, write /run/peerpod, then fail with 70."""
    (tmp_path / "media/cidata").mkdir(parents=True)
    (tmp_path / "media/cidata/user-data").write_text("#cloud-config\nwrite_files: []\n")
    conf = tmp_path / "bad.toml"
    conf.write_text('provider = "cidata"\n[netns]\nname = "a/b"\n[network]\nwait = false\n[tpm]\nenabled = false\n')
    assert cli.main(["run", "--root", str(tmp_path), "--config", str(conf)]) == 78
    assert not (tmp_path / "run/peerpod").exists()


@pytest.mark.parametrize(
    ("argv", "code"),
    [
        (["nosuch"], 64),
        (["check"], 64),
        (["run", "--bogus"], 64),
        (["run", "--root"], 64),
        (["run", "run"], 64),
        (["--root", "/r", "run"], 64),
        (["netns"], 64),
    ],
)
def test_usage_errors_exit_64(argv: list[str], code: int, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        cli.main(argv)
    assert ei.value.code == code
    assert "usage: guest-agent" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["run"], {"verbose": False, "root": "/", "config": None}),
        (["-v", "run"], {"verbose": True, "root": "/", "config": None}),
        (
            ["--verbose", "run", "--root", "/r", "--config", "/c.toml"],
            {"verbose": True, "root": "/r", "config": "/c.toml"},
        ),
        (["run", "--root=/r", "--config", ""], {"verbose": False, "root": "/r", "config": ""}),
    ],
)
def test_run_arguments(argv: list[str], expected: dict[str, object]) -> None:
    assert vars(cli._parser().parse_args(argv)) == {"command": "run", **expected}


def test_missing_inputs_exit_66(tmp_path: Path) -> None:
    assert cli.main(["check", str(tmp_path / "absent")]) == 66
    assert cli.main(["provision", "--root", str(tmp_path), "--user-data", str(tmp_path / "absent")]) == 66
    assert cli.main(["timeline", "--root", str(tmp_path)]) == 66  # no previous run


def test_help_lists_exit_codes_config_paths_and_describes_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    from guest_agent.errors import EXIT_CODES

    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "/etc/guest-agent/config.toml" in out and "/etc/guest-agent/config.d/*.toml" in out
    for code in EXIT_CODES:
        assert f"\n  {code:3}  " in out
    for sub in (["run"], ["check"], ["timeline"], ["config"], ["netns", "imds-nat"]):
        with pytest.raises(SystemExit):
            cli.main([*sub, "--help"])
        text = capsys.readouterr().out
        assert text.split("\n\n")[1].strip(), sub  # a description paragraph after the usage


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="no setpriv")
def test_missing_capability_exits_77_not_70(tmp_path: Path) -> None:
    """Root without capabilities (setpriv drops them all): an operator error, not a bug."""
    drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"]
    proc = subprocess.run(
        [*drop, sys.executable, "-m", "guest_agent", "netns", "ensure", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if "setpriv:" in proc.stderr:
        pytest.skip(f"setpriv cannot drop capabilities here: {proc.stderr.strip()}")
    assert proc.returncode == 77, proc.stderr
    assert "permission denied" in proc.stderr
