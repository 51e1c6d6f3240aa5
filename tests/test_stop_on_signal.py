"""A pytest run ended by SIGTERM leaves no network namespace mount behind (tests/conftest.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netutil import mountinfo
from tests.test_build_safety import wait_for

REPO = Path(__file__).resolve().parents[1]

INNER = """
import time
from pathlib import Path

from tests.netutil import namespaces


def test_holds_a_namespace(tmp_path):
    with namespaces(tmp_path) as ns:
        ns.add("held")
        Path({ready!r} + ".tmp").write_text(ns.run_dir)
        Path({ready!r} + ".tmp").rename({ready!r})  # whole when it appears
        time.sleep(120)
"""


def mounts_under(path: str) -> list[str]:
    return [t for t in (fields[4] for fields in mountinfo()) if t == path or t.startswith(path + "/")]


@pytest.mark.privileged
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_a_signalled_run_tears_its_namespaces_down(tmp_path: Path, sig: signal.Signals) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create network namespaces")
    ready = tmp_path / "ready"
    inner = tmp_path / "inner" / "test_inner.py"
    inner.parent.mkdir()
    inner.write_text(INNER.format(ready=str(ready)))
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest"]
    argv += ["--basetemp", str(tmp_path / "base"), "--rootdir", str(inner.parent), str(inner)]
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = ""
    try:
        run_dir = os.path.realpath(wait_for(ready, proc, timeout_s=60))
        assert mounts_under(run_dir)  # the namespace is held while the test sleeps
        proc.send_signal(sig)
        out = proc.communicate(timeout=60)[0]
        left = mounts_under(run_dir)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        # What a broken handler leaves, undone here so that this test leaves nothing either.
        for target in sorted(mounts_under(run_dir) if run_dir else [], reverse=True):
            subprocess.run(["umount", target], check=False)
    assert proc.returncode == 128 + sig, out
    assert f"stopped by {sig.name}" in out
    assert left == []
