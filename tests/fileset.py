"""File sets for the set-atomicity tests, what a reader sees of them, and a model of both."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from guest_agent import files
from guest_agent.files import FileSpec

PEERPOD = "/run/peerpod"
# What CAA's tmpfiles `C` lines copy there at boot (podvm/files/etc/tmpfiles.d/{auth,policy}.conf).
DEFAULTS = {"auth.json": (0o644, b'{"auths":{}}\n'), "policy.rego": (0o644, b"package agent_policy\ndefault allow\n")}


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
    for name in sorted(os.listdir(d)):
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
    bad += [n for n in os.listdir(d) if not n.startswith("..") and not (d / n).exists()]
    return sorted(bad)
