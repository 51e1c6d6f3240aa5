"""The image's `guest-agent` script and bytecode step (image/recipe.sh agent_entry), run on a venv made
here the way agent_venv runs it in the image root, and the script exec'd through its `#!` line as
systemd runs it."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from guest_agent import __version__

REPO = Path(__file__).resolve().parents[1]


def make_venv(tmp_path: Path) -> tuple[Path, Path]:
    """(venv, its site-packages), without pip: the image uninstalls it too."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    (site,) = venv.glob("lib/python3*/site-packages")
    return venv, site


def copy_package(dest: Path) -> None:
    """The agent and the packages it imports at start (as pip installs them, less the bytecode)."""
    no_bytecode = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "guest_agent", dest / "guest_agent", ignore=no_bytecode)
    for name in ("h11", "yaml"):
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.submodule_search_locations, name
        shutil.copytree(spec.submodule_search_locations[0], dest / name, ignore=no_bytecode)


def agent_entry(venv: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", 'source "$0" && agent_entry "$1"', str(REPO / "image/recipe.sh"), str(venv)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def version(venv: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin/guest-agent"), "--version"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        cwd=venv,
        timeout=60,
    )


def test_the_script_is_isolated_and_every_module_has_bytecode(tmp_path: Path) -> None:
    venv, site = make_venv(tmp_path)
    copy_package(site)  # as pip installs it, less the bytecode pip would compile
    done = agent_entry(venv)
    assert done.returncode == 0, done.stderr
    script = venv / "bin/guest-agent"
    assert script.read_text().splitlines()[0] == f"#!{venv}/bin/python3 -I"
    assert os.stat(script).st_mode & 0o777 == 0o755
    sources = list(site.rglob("*.py"))
    assert len(sources) > 20
    # The level the `#!` line runs at (no -O): the file name without an `.opt-N` tag.
    assert [p for p in sources if not Path(importlib.util.cache_from_source(str(p), optimization="")).is_file()] == []
    # -I: a PYTHONPATH naming a broken guest_agent package is ignored.
    bogus = tmp_path / "bogus" / "guest_agent"
    bogus.mkdir(parents=True)
    (bogus / "__init__.py").write_text("raise SystemExit('PYTHONPATH was used')\n")
    res = version(venv, PYTHONPATH=str(bogus.parent))
    assert (res.returncode, res.stdout.strip()) == (0, f"guest-agent {__version__}"), res.stderr


def test_a_pth_file_written_after_the_build_is_honoured(tmp_path: Path) -> None:
    """No `-S` and no sys.path written into the script: `site` runs at every start, so a package
    reached through a .pth file added after the build step (an editable install, a distribution's
    directory) is found."""
    venv, site = make_venv(tmp_path)
    assert agent_entry(venv).returncode == 0
    assert version(venv).returncode != 0  # the agent is not installed yet
    later = tmp_path / "later"
    copy_package(later)
    (site / "later.pth").write_text(f"{later}\n")
    res = version(venv)
    assert (res.returncode, res.stdout.strip()) == (0, f"guest-agent {__version__}"), res.stderr


def test_a_module_that_does_not_compile_fails_the_build(tmp_path: Path) -> None:
    venv, site = make_venv(tmp_path)
    copy_package(site)
    (site / "broken.py").write_text("def f(:\n")
    done = agent_entry(venv)
    assert done.returncode != 0
    assert "agent_entry: compileall failed" in done.stderr
