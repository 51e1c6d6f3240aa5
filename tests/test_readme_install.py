"""The README's install section as `make readme-check` reads it (tests/readme_install.py).

`make readme-check` (root, Debian roots) runs the commands; these checks keep the README readable by
it without root: every block parses, and what the check cannot run is refused, not skipped.
"""

from __future__ import annotations

import re

import pytest

from tests import readme_install
from tests.readme_install import PLACES, ReadmeError, routes

REPO = readme_install.README.parent
HOST, DEB_ROOT, REPO_ROOT = PLACES


def test_the_readme_has_both_routes_with_host_and_root_lines() -> None:
    found = routes(readme_install.README.read_text())
    assert set(found) == {"deb", "venv"}
    for route, steps in found.items():
        assert {s.place.where for s in steps} == {"host", "root"}, route
        assert steps[0].first


def test_the_venv_route_installs_into_the_units_bindir() -> None:
    """make install's BINDIR is where the venv's pip puts the script, or ExecStart names nothing."""
    commands = " ".join(s.command for s in routes(readme_install.README.read_text())["venv"])
    venv = re.search(r"python3 -m venv (\S+)", commands)
    bindir = re.search(r"make install .*BINDIR=(\S+)", commands)
    assert venv and bindir
    assert bindir.group(1) == f"{venv.group(1)}/bin"


def test_paths_the_section_names_exist() -> None:
    text = "\n".join(readme_install.section(readme_install.README.read_text()))
    named = set(re.findall(r"\]\(([^)#]+)\)", text)) | set(
        re.findall(r"`((?:packaging|image|docs|units|debian)/[^`\s]*[^`\s/])`", text)
    )
    assert named
    for path in sorted(named):
        assert (REPO / path).exists(), path


def readme(*blocks: tuple[str, list[str]]) -> str:
    body = "".join(f"**{label}** words:\n\n```\n" + "\n".join(lines) + "\n```\n\n" for label, lines in blocks)
    return f"# guest-agent\n\n{readme_install.SECTION}\n\n{body}## Next\n\n```\nnot read\n```\n"


GOOD_DEB = ("As a Debian package", [HOST, "make deb", DEB_ROOT, "apt-get install -y /tmp/x.deb"])
GOOD_VENV = ("Otherwise, a venv", [REPO_ROOT, "python3 -m venv /v", "", HOST, "make install", "systemctl preset"])


def test_steps_keep_order_place_and_first_line() -> None:
    found = routes(readme(GOOD_DEB, GOOD_VENV))
    assert [(s.place.where, s.command, s.first) for s in found["venv"]] == [
        ("root", "python3 -m venv /v", True),
        ("host", "make install", True),
        ("host", "systemctl preset", False),
    ]
    assert found["venv"][0].place.setup == "repo"
    assert found["deb"][1].place.cwd == "/"


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (readme(GOOD_DEB), r"no code block for \['venv'\]"),
        (readme(GOOD_DEB, GOOD_VENV, ("Another way", [HOST, "true"])), "a code block after 'Another way'"),
        (readme(GOOD_DEB, GOOD_VENV, GOOD_VENV), "venv: a second code block"),
        (readme(GOOD_DEB, ("Otherwise, a venv", ["make install"])), "before any comment"),
        (readme(GOOD_DEB, ("Otherwise, a venv", ["# somewhere else:", "make install"])), "unknown comment"),
        (readme(GOOD_DEB, ("Otherwise, a venv", [HOST])), "venv: an empty block"),
        (readme(GOOD_DEB, ("Otherwise, a venv", [HOST, "make\tinstall"])), "a tab"),
        (readme(GOOD_DEB, GOOD_VENV).replace(readme_install.SECTION, "## Installing"), "no line"),
        (readme(GOOD_DEB, GOOD_VENV).replace("## Next\n\n```\nnot read\n```\n", "```\n"), "unclosed"),
    ],
)
def test_what_the_check_cannot_run_is_refused(text: str, reason: str) -> None:
    with pytest.raises(ReadmeError, match=reason):
        routes(text)


def test_the_command_line_prints_one_step_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert readme_install.main(["venv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    fields = [line.split("\t") for line in lines]
    assert all(len(f) == 4 for f in fields)
    assert fields[0][:3] == ["root", "repo", "/tmp/guest-agent"]
    assert readme_install.main(["pip"]) == 2
