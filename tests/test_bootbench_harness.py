"""The boot benchmark's harness (tests/bootbench/run.py): its contention check (another QEMU process
during a boot makes it measure the boot again; this boot's own forks, guestfwd relays before they
exec, must not count, whoever their parent is), and the figures counted from systemd's start."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from tests.bootbench import run


def test_forks_with_this_boots_command_line_are_not_another_qemu(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-x86_64"
    os.symlink("/bin/sleep", fake)
    own = subprocess.Popen([str(fake), "60"])
    twin = subprocess.Popen([str(fake), "60"])  # same argv, not own's child: a relay fork's double
    other = subprocess.Popen([str(fake), "61"])  # another boot's QEMU
    try:
        for p in (own, twin, other):  # Popen returns after fork(): wait until each has exec'd
            cmdline = Path(f"/proc/{p.pid}/cmdline")
            deadline = time.monotonic() + 30
            while b"qemu-system" not in cmdline.read_bytes() and time.monotonic() < deadline:
                time.sleep(0.01)
        seen = run.other_qemus(own.pid)
        assert other.pid in seen
        assert own.pid not in seen and twin.pid not in seen
    finally:
        for p in (own, twin, other):
            p.kill()
            p.wait()


ALL_UNITS = """Id=-.slice
InactiveExitTimestampMonotonic=0

Id=init.scope
InactiveExitTimestampMonotonic=4059662
ActiveEnterTimestampMonotonic=4059662

Id=multi-user.target
InactiveExitTimestampMonotonic=10171000
ActiveEnterTimestampMonotonic=10171912
"""


def test_unit_times_from_the_boot_report() -> None:
    assert run.unit_monotonic(ALL_UNITS, "init.scope") == 4.059662
    assert run.unit_monotonic(ALL_UNITS, "multi-user.target", "ActiveEnterTimestampMonotonic") == 10.171912
    assert run.unit_monotonic(ALL_UNITS, "-.slice") is None  # never (0): no time
    assert run.unit_monotonic(ALL_UNITS, "absent.service") is None
    assert run.unit_monotonic("", "init.scope") is None


def test_table_since_systemd_subtracts_each_boots_own_start() -> None:
    boots = [
        run.Boot("guest-agent", 0, figures={"systemd": 8.0, "dhcp": 14.0, "dhcp_sys": 6.0}),
        run.Boot("guest-agent", 1, figures={"systemd": 7.0, "dhcp": 12.0, "dhcp_sys": 5.0}),
        run.Boot("floor-tuned", 0, figures={"systemd": 7.5, "dhcp": 13.0, "dhcp_sys": 5.5}),
    ]
    summary = run.summarise(boots, ["guest-agent", "floor-tuned"])
    text = run.table_since_systemd(summary, ["guest-agent", "floor-tuned"])
    assert "| systemd started (seconds from QEMU start) | 7.5 (7.0-8.0) | 7.5 |" in text
    assert "| DHCP lease | 5.5 (5.0-6.0) | 5.5 |" in text
    assert "Ready" not in text  # rows no variant has are left out
