"""Cost of files.apply(): a CAA-sized set written over a previous set, on tmpfs (like /run).

    python -m bench.files [--runs N] [--baseline REV]

Each run lays CAA's tmpfiles defaults and a previous agent set in a fresh directory
(untimed), then times one apply() of the new set.  With --baseline, the files.py of git
revision REV is loaded beside the current one and the two are timed interleaved, run by
run, so machine noise hits both alike.  Prints the median and quartiles in microseconds.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

from guest_agent import files
from tests.fileset import PLANS, lay_defaults


def load_rev(rev: str) -> ModuleType:
    src = subprocess.run(["git", "show", f"{rev}:guest_agent/files.py"], check=True, capture_output=True).stdout
    d = Path(tempfile.mkdtemp(prefix="guest-agent-bench-"))
    (d / "files_baseline.py").write_bytes(src)
    spec = importlib.util.spec_from_file_location("files_baseline", d / "files_baseline.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    shutil.rmtree(d)
    return mod


def one(mod: ModuleType, base: Path, n: int) -> float:
    root = base / str(n)
    lay_defaults(root)
    mod.apply(PLANS["old"], root=str(root))
    t0 = time.perf_counter()
    mod.apply(PLANS["new"], root=str(root))
    dt = time.perf_counter() - t0
    shutil.rmtree(root)
    return dt


def describe(name: str, xs: list[float]) -> str:
    q = statistics.quantiles([x * 1e6 for x in xs], n=4)
    return f"{name:10} median {q[1]:7.0f} us  (quartiles {q[0]:.0f}-{q[2]:.0f} us, {len(xs)} runs)"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--baseline", help="git revision whose files.py to compare with")
    args = ap.parse_args()
    mods = {"current": files}
    if args.baseline:
        mods = {f"{args.baseline}": load_rev(args.baseline), "current": files}
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    base = Path(tempfile.mkdtemp(prefix="guest-agent-bench-", dir=shm))
    try:
        times: dict[str, list[float]] = {k: [] for k in mods}
        for n in range(args.runs):
            for name, mod in mods.items():
                times[name].append(one(mod, base, n))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"apply() of {len(PLANS['new'])} files over a previous set of {len(PLANS['old'])}, on {shm or 'tmp'}:")
    for name, xs in times.items():
        print(describe(name, xs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
