from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from guest_agent.config import Config
from tests.fakecloud.wireserver import FakeWireserver
from tests.swtpm import Swtpm


def _stop(signum: int, _frame: object) -> None:
    pytest.exit(f"stopped by {signal.Signals(signum).name}", returncode=128 + signum)


def pytest_configure(config: pytest.Config) -> None:
    """SIGTERM and SIGHUP (a CI timeout, `timeout`, a closed terminal) end the run as Ctrl-C does:
    the running test unwinds and every fixture is torn down (network namespaces and their mounts,
    swtpm, servers).  Python's default for SIGTERM ends the process at once and left them behind."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _stop)


def snapshot(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry under root: path -> (mode, content or link target)."""
    out: dict[str, tuple[int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = (st.st_mode, os.readlink(p))
            elif p.is_file():
                out[rel] = (st.st_mode, p.read_bytes())
            else:
                out[rel] = (st.st_mode, "")
    return out


@pytest.fixture
def cfg() -> Config:
    """Defaults, with the steps that need root (netns, TPM) off."""
    c = Config()
    return dataclasses.replace(
        c, netns=dataclasses.replace(c.netns, enabled=False), tpm=dataclasses.replace(c.tpm, enabled=False)
    )


@pytest.fixture
def swtpm() -> Iterator[Swtpm]:
    t = Swtpm()
    try:
        yield t
    finally:
        t.stop()


@pytest.fixture
def servers() -> Iterator[Callable[..., FakeWireserver]]:
    """Fake wireservers started on demand, all stopped at the end of the test."""
    started: list[FakeWireserver] = []

    def make(**kw: Any) -> FakeWireserver:
        ws = FakeWireserver(**kw).start()
        started.append(ws)
        return ws

    yield make
    for ws in started:
        ws.stop()
