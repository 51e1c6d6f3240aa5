"""The launcher the image installs as `guest-agent` (guest_agent/launcher.py), run as systemd runs it:
exec'd through its `#!` line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from guest_agent import __version__, launcher

REPO = Path(__file__).resolve().parents[1]


def test_written_launcher_starts_the_agent_with_isolated_flags(tmp_path: Path) -> None:
    out = tmp_path / "bin" / "guest-agent"
    subprocess.run([sys.executable, "-m", "guest_agent.launcher", str(out)], check=True, cwd=tmp_path)
    text = out.read_text()
    assert text.splitlines()[0] == f"#!{sys.executable} -ISB"
    assert os.stat(out).st_mode & 0o777 == 0o755
    # -I: a PYTHONPATH naming a broken guest_agent package is ignored.
    bogus = tmp_path / "bogus" / "guest_agent"
    bogus.mkdir(parents=True)
    (bogus / "__init__.py").write_text("raise SystemExit('PYTHONPATH was used')\n")
    env = {**os.environ, "PYTHONPATH": str(bogus.parent)}
    res = subprocess.run([str(out), "--version"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert (res.returncode, res.stdout.strip()) == (0, f"guest-agent {__version__}")


def test_launcher_writes_no_bytecode(tmp_path: Path) -> None:
    """-B: a package without __pycache__ stays without it (a boot never writes to the image)."""
    copy = tmp_path / "src"
    shutil.copytree(REPO / "guest_agent", copy / "guest_agent", ignore=shutil.ignore_patterns("__pycache__"))
    dirs = [str(copy), *[d for d in launcher.site_dirs() if Path(d) != REPO]]
    path = tmp_path / "guest-agent"
    path.write_text(launcher.script(sys.executable, dirs))
    path.chmod(0o755)
    res = subprocess.run([str(path), "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert not list(copy.rglob("__pycache__"))


def test_script_refuses_an_interpreter_path_a_shebang_cannot_carry() -> None:
    with pytest.raises(ValueError):
        launcher.script("/opt/my venv/bin/python3", [])
    with pytest.raises(ValueError):
        launcher.script("/" + "p" * 300, [])


def test_usage_error() -> None:
    assert launcher.main(["--help"]) == 64


def test_bytecode_is_compiled_for_the_dependencies_only() -> None:
    """PyYAML (a requirement) is in the list; pytest (a dev extra) is not."""
    names = {Path(f).parts[-2] for f in launcher.dependency_files()}
    assert "yaml" in names
    assert "_pytest" not in names and "pytest" not in names
