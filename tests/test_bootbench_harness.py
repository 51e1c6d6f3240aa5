"""The boot benchmark's contention check (tests/bootbench/run.py): another QEMU process during a
boot makes it measure the boot again; this boot's own forks (guestfwd relays before they exec)
must not count, whoever their parent is."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.bootbench import run


def test_forks_with_this_boots_command_line_are_not_another_qemu(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    os.symlink("/bin/sleep", fake)
    own = subprocess.Popen([str(fake), "60"])
    twin = subprocess.Popen([str(fake), "60"])  # same argv, not own's child: a relay fork's double
    other = subprocess.Popen([str(fake), "61"])  # another boot's QEMU
    try:
        seen = run.other_qemus(own.pid)
        assert other.pid in seen
        assert own.pid not in seen and twin.pid not in seen
    finally:
        for p in (own, twin, other):
            p.kill()
            p.wait()
