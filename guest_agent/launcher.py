"""Write the `guest-agent` launcher: the interpreter with `-I -S -B`, its paths spelled out.

    <python> -m guest_agent.launcher [PATH]     (stdout when PATH is omitted)

Run it with the interpreter that has the package installed (a venv's `bin/python3`, or the
system `python3` after `pip install`), at image build time.  It

1. compiles the bytecode of the package and of every module of its dependencies (as their
   installers recorded them) at the optimisation level the launcher runs with, so the
   `__pycache__` files the boot reads are the ones written here;
2. writes a script whose `#!` line starts that interpreter with `-ISB`:
   - `-I` (isolated): no PYTHON* variables, no user site, no script directory on sys.path;
   - `-S`: no `site` at start-up (no venv discovery, no `.pth` scan, no editable-install
     finders): the script puts the site directories on sys.path itself, as `site` would
     have found them when this command ran;
   - `-B`: never write bytecode.  With step 1 nothing is compiled at boot either; a source
     file changed after the build is still compiled (in memory) and used, only not cached.

pip's console script (`#!<python>` and `import site` by default) works too; this one starts
faster (`make bench`: the launcher rows against `python -m guest_agent`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

FLAGS = "-ISB"


def site_dirs() -> list[str]:
    """The directories `site` puts on sys.path for this interpreter that exist, in its order,
    and first the one this package was imported from if `site` only reaches it through a
    `.pth` file (editable installs)."""
    import site

    dirs = [d for d in site.getsitepackages() if os.path.isdir(d)]
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if here not in dirs:
        dirs.insert(0, here)
    return list(dict.fromkeys(dirs))


def script(python: str, dirs: Sequence[str]) -> str:
    """The launcher's text.  Linux passes everything after the interpreter on a `#!` line as one
    argument: `-ISB` is one word, which CPython reads as three flags."""
    if any(c.isspace() for c in python) or len(python) + len(FLAGS) + 3 > 255:
        raise ValueError(f"interpreter path unusable on a #! line: {python!r}")
    return (
        f"#!{python} {FLAGS}\n"
        "# guest-agent launcher, written by `python -m guest_agent.launcher` (see that module).\n"
        "import sys\n"
        f"sys.path.extend({list(dirs)!r})\n"
        "from guest_agent.cli import main\n"
        "sys.exit(main())\n"
    )


def dependency_files(dist_name: str = "guest-agent") -> list[str]:
    """The `.py` files of this distribution and of everything it requires (extras left out), as
    their installers recorded them; a requirement that is not installed is skipped."""
    import re
    from importlib import metadata

    seen: set[str] = set()
    todo, out = [dist_name], list[str]()
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        out.extend(str(f.locate()) for f in dist.files or () if f.suffix == ".py")
        for req in dist.requires or ():
            m = re.match(r"[A-Za-z0-9._-]+", req)
            if m and "extra ==" not in req:
                todo.append(m.group(0))
    return out


def compile_all() -> bool:
    """Bytecode for this package and every module of its dependencies, at the launcher's
    optimisation level (none: `-ISB` does not change it); up-to-date files are left alone.  Only
    those files: a distribution's shared directory (/usr/lib/python3/dist-packages) is its
    package manager's to compile."""
    import compileall
    import contextlib

    package = os.path.dirname(os.path.abspath(__file__))  # also for an editable install
    with contextlib.redirect_stdout(sys.stderr):
        ok = bool(compileall.compile_dir(package, quiet=1, optimize=0))
        for path in dependency_files():
            ok = bool(compileall.compile_file(path, quiet=1, optimize=0)) and ok
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: python -m guest_agent.launcher [PATH]", file=sys.stderr)
        return 64
    dirs = site_dirs()
    if not compile_all():
        print("guest_agent.launcher: a module of the agent or its dependencies did not compile", file=sys.stderr)
        return 1
    text = script(sys.executable, dirs)
    if not args:
        sys.stdout.write(text)
        return 0
    from guest_agent import files
    from guest_agent.errors import AgentError

    path = os.path.abspath(args[0])
    try:
        files.write_atomic(path, text.encode(), mode=0o755)
    except AgentError as err:
        print(f"guest_agent.launcher: {err.describe()}", file=sys.stderr)
        return 73
    return 0


if __name__ == "__main__":
    sys.exit(main())
