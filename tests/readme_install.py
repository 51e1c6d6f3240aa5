"""The README's install commands, read from its code blocks, for packaging/readme-check.sh.

The section "Putting guest-agent into a pod VM image" has one code block per route (the Debian
package, the venv fallback), each after a paragraph whose bold label names the route.  Inside a
block, a comment line says where the lines under it run: on the build host in this repository
(with ROOTFS naming the image root), or chrooted in the image root.  The check runs every line as
written, there.  A label, comment or block this module does not know is an error, so the README and
the check cannot drift apart unnoticed.

    python3 -m tests.readme_install ROUTE   # one step a line: where TAB setup TAB cwd TAB command
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Putting guest-agent into a pod VM image"
FENCE = "```"
# bold label of the paragraph before a block -> route
ROUTES = {"As a Debian package": "deb", "Otherwise, a venv": "venv"}


@dataclass(frozen=True)
class Place:
    """Where the lines under a comment run."""

    where: str  # "host": this repository, ROOTFS set; "root": chrooted in the image root
    cwd: str = "/"  # in the image root
    setup: str = "-"  # "repo": the repository's files are copied to cwd first


# The comments a block may use, exactly.
PLACES = {
    "# on the build host, in this repository (ROOTFS: the image root):": Place("host", cwd="-"),
    "# in the image root (chroot, an mmdebstrap customize hook):": Place("root"),
    "# in the image root (chroot), in a copy of this repository:": Place("root", "/tmp/guest-agent", "repo"),
}


@dataclass(frozen=True)
class Step:
    place: Place
    command: str
    first: bool  # the first line under its comment: the place's setup runs before it


class ReadmeError(Exception):
    pass


def section(readme: str) -> list[str]:
    lines = readme.splitlines()
    if SECTION not in lines:
        raise ReadmeError(f"no line {SECTION!r}")
    start = lines.index(SECTION) + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def block_steps(route: str, block: list[str]) -> list[Step]:
    steps: list[Step] = []
    place = None
    first = False
    for line in (raw.rstrip() for raw in block):
        if not line:
            continue
        if line.startswith("#"):
            if line not in PLACES:
                raise ReadmeError(f"{route}: unknown comment {line!r}; the check knows: {list(PLACES)}")
            place, first = PLACES[line], True
            continue
        if place is None:
            raise ReadmeError(f"{route}: {line!r} comes before any comment saying where it runs")
        if "\t" in line:
            raise ReadmeError(f"{route}: a tab in {line!r}")
        steps.append(Step(place, line, first))
        first = False
    if not steps:
        raise ReadmeError(f"{route}: an empty block")
    return steps


def routes(readme: str) -> dict[str, list[Step]]:
    """Each route's steps, in the README's order."""
    out: dict[str, list[Step]] = {}
    label = None
    block: list[str] | None = None
    for line in section(readme):
        if block is not None:
            if line.strip() == FENCE:
                route = ROUTES.get(label or "")
                if route is None:
                    raise ReadmeError(f"a code block after {label!r}; the check knows: {list(ROUTES)}")
                if route in out:
                    raise ReadmeError(f"{route}: a second code block after {label!r}")
                out[route] = block_steps(route, block)
                block = None
            else:
                block.append(line)
        elif line.strip().startswith(FENCE):
            block = []
        elif m := re.match(r"\*\*(.+?)\*\*", line):
            label = m.group(1)
    if block is not None:
        raise ReadmeError("an unclosed code block")
    missing = set(ROUTES.values()) - set(out)
    if missing:
        raise ReadmeError(f"no code block for {sorted(missing)}")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ROUTES.values():
        print(f"usage: python3 -m tests.readme_install {{{','.join(ROUTES.values())}}}", file=sys.stderr)
        return 2
    try:
        steps = routes(README.read_text())[argv[0]]
    except ReadmeError as e:
        print(f"README.md, {SECTION[3:]!r}: {e}", file=sys.stderr)
        return 1
    for s in steps:
        print("\t".join((s.place.where, s.place.setup if s.first else "-", s.place.cwd, s.command)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
