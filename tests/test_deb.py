"""debian/ against pyproject.toml and the agent: what `make deb` would otherwise get wrong silently.

The package itself is built by `make deb` (lintian) and installed into Debian chroots by
`make deb-check`; these checks keep the hand-written parts of debian/ in step with the project.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import guest_agent

REPO = Path(__file__).resolve().parents[1]
DEBIAN = REPO / "debian"


def project() -> dict[str, object]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]  # type: ignore[no-any-return]


def test_changelog_version_is_the_agents() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    m = re.fullmatch(r"guest-agent \(([^)]+)\) [a-z-]+; urgency=\w+", first)
    assert m, first
    assert m.group(1).split("-")[0] == guest_agent.__version__


def test_python_version_is_pyprojects() -> None:
    control = (DEBIAN / "control").read_text()
    m = re.search(r"^X-Python3-Version: >= (\S+)$", control, re.M)
    assert m, "X-Python3-Version missing in debian/control"
    assert project()["requires-python"] == f">={m.group(1)}"


def test_every_dependency_has_a_versioned_mapping() -> None:
    """dh_python3 turns each requirement's range into versioned Depends only through these lines."""
    mapped = {}
    for line in (DEBIAN / "py3dist-overrides").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, rest = line.split(None, 1)
            mapped[canonicalize_name(name)] = rest
    deps = project()["dependencies"]
    assert isinstance(deps, list)
    names = {canonicalize_name(Requirement(r).name) for r in deps}
    assert names == set(mapped), "debian/py3dist-overrides must name exactly pyproject.toml's dependencies"
    for name, rest in mapped.items():
        assert re.fullmatch(r"python3-[a-z0-9.+-]+; PEP386", rest), f"{name}: {rest}"


def test_rules_installs_with_the_makefile_into_usr() -> None:
    rules = (DEBIAN / "rules").read_text()
    assert "$(MAKE) install DESTDIR=$(CURDIR)/debian/guest-agent PREFIX=/usr BINDIR=/usr/bin" in rules
    assert "--no-start" in rules
