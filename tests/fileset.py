"""File sets for the set-atomicity tests, what a reader sees of them, and a model of both."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from guest_agent import files
from guest_agent.files import FileSpec

PEERPOD = "/run/peerpod"
# What CAA's tmpfiles `C` lines copy there at boot (podvm/files/etc/tmpfiles.d/{auth,policy}.conf).
DEFAULTS = {"auth.json": (0o644, b'{"auths":{}}\n'), "policy.rego": (0o644, b"package agent_policy\ndefault allow\n")}
# Their sources, as CAA's image ships them.
DEFAULT_SOURCES = {"auth.json": "/etc/kata-oci/empty-auth.json", "policy.rego": "/etc/kata-opa/allow-all.rego"}


def _spec(name: str, content: bytes, mode: int = 0o600) -> FileSpec:
    return FileSpec(f"{PEERPOD}/{name}", content, mode)


# "old" replaces the default policy.rego; "new" replaces the default auth.json, adds cdh.toml
# and the scratch marker, and lacks policy.rego.
PLANS = {
    "old": [
        _spec("apf.json", b'{"pod-network": "old"}\n'),
        _spec("initdata", b"old initdata\n"),
        _spec("aa.toml", b"# old aa\n"),
        _spec("policy.rego", b"package agent_policy\n# old\n"),
        _spec("initdata.digest", b"0" * 64, 0o644),
    ],
    "new": [
        _spec("apf.json", b'{"pod-network": "new"}\n'),
        _spec("auth.json", b'{"auths":{"registry.example":{}}}\n'),
        _spec("initdata", b"new initdata\n"),
        _spec("aa.toml", b"# new aa\n"),
        _spec("cdh.toml", b"# new cdh\n"),
        _spec("scratch-space.marker", b""),
        _spec("initdata.digest", b"1" * 64, 0o644),
    ],
}

Visible = dict[str, tuple[int, bytes]]


def visible(d: Path) -> Visible:
    """What a consumer sees: every name that resolves (following symlinks), its mode and bytes."""
    out: Visible = {}
    for name in sorted(os.listdir(d)) if d.is_dir() else []:  # a run killed before it made the directory
        p = d / name
        if name.startswith("..") or not p.exists():
            continue
        out[name] = (p.stat().st_mode & 0o7777, p.read_bytes())
    return out


@dataclass(frozen=True)
class State:
    """The model: what is visible, and which of it the agent wrote."""

    visible: Visible
    written: frozenset[str]

    def apply(self, plan: list[FileSpec]) -> State:
        names = {s.path.rsplit("/", 1)[1]: s for s in plan}
        kept = {n: v for n, v in self.visible.items() if n not in names and n not in self.written}
        return State(kept | {n: (s.mode, s.content) for n, s in names.items()}, frozenset(names))

    def without(self, names: set[str]) -> State:
        return State({n: v for n, v in self.visible.items() if n not in names}, self.written - names)

    def with_defaults(self) -> State:
        """After the tmpfiles `C` lines: each default where its name shows nothing."""
        return State({**DEFAULTS, **self.visible}, self.written)


def after_kill(before: State, after: State, seen: Visible) -> tuple[str, State]:
    """Which side of the switch a killed run left, as a State: the old set, less names the new one
    drops (removed just before the switch), or the new set, less names it adds (linked just
    after).  Anything else, a name with old content beside one with new, is a mixed set."""
    for side, full, other in (("old", before, after), ("new", after, before)):
        missing = set(full.visible) - set(seen)
        if all(full.visible.get(n) == v for n, v in seen.items()) and missing <= set(full.visible) - set(other.visible):
            return side, full.without(missing)
    raise AssertionError(f"mixed set: {sorted(seen)}")


def lay_tmpfiles(root: Path) -> None:
    """CAA's tmpfiles.d lines and their sources, under `root` (see run_tmpfiles)."""
    for name, (mode, content) in DEFAULTS.items():
        src = root / DEFAULT_SOURCES[name].lstrip("/")
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(content)
        src.chmod(mode)
        conf = root / f"etc/tmpfiles.d/{name.split('.')[0]}.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        conf.write_text(f"C {PEERPOD}/{name} - - - - {DEFAULT_SOURCES[name]}\n")


def run_tmpfiles(root: Path) -> None:
    """systemd-tmpfiles-setup's work on `root`: copies each default whose name has no entry."""
    tool = shutil.which("systemd-tmpfiles")
    assert tool is not None
    subprocess.run([tool, "--create", f"--root={root}"], check=True, capture_output=True, timeout=60)


def dangling(d: Path) -> list[str]:
    """Symlinks that resolve to nothing: "no such file" to a reader, an existing file to tmpfiles."""
    return sorted(n for n in (os.listdir(d) if d.is_dir() else []) if (d / n).is_symlink() and not (d / n).exists())


def defaults_state() -> State:
    return State(dict(DEFAULTS), frozenset())


def lay_defaults(root: Path) -> None:
    d = root / PEERPOD.lstrip("/")
    d.mkdir(parents=True, exist_ok=True)
    for name, (mode, content) in DEFAULTS.items():
        (d / name).write_bytes(content)
        (d / name).chmod(mode)


def leftovers(d: Path) -> list[str]:
    """Anything a finished run should not leave: extra generations, temp links, dangling links."""
    dots = [n for n in os.listdir(d) if n.startswith("..")]
    gens = [n for n in dots if n.startswith(files.GEN_PREFIX)]
    bad = [n for n in dots if n != files.DATA and not n.startswith(files.GEN_PREFIX)]
    bad += gens[1:]
    return sorted(bad + dangling(d))
