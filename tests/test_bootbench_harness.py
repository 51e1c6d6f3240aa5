"""The boot benchmark's harness (bench/boot/run.py): its contention check (another QEMU process
during a boot makes it measure the boot again; this boot's own forks, guestfwd relays before they
exec, must not count, whoever their parent is), and the figures counted from systemd's start."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from bench.boot import run


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


def test_figures_since_systemd_subtract_each_boots_own_start() -> None:
    fig: dict[str, float | None] = {"systemd": 8.0, "dhcp": 14.25, "ready": None, "multi_user": 16.0}
    assert run.since_systemd(fig) == {
        "agent_process_sys": None,
        "agent_warm_sys": None,
        "dhcp_sys": 6.25,
        "ready_sys": None,  # not reached: no figure
        "apf_sys": None,
        "multi_user_sys": 8.0,
    }
    assert set(run.since_systemd({"dhcp": 14.0}).values()) == {None}  # no init.scope start: none


def test_table_since_systemd_medians_per_variant() -> None:
    def boot(variant: str, rnd: int, systemd: float, dhcp: float) -> run.Boot:
        fig: dict[str, float | None] = {"systemd": systemd, "dhcp": dhcp}
        return run.Boot(variant, rnd, figures={**fig, **run.since_systemd(fig)})

    boots = [boot("guest-agent", 0, 8.0, 14.0), boot("guest-agent", 1, 7.0, 12.0), boot("floor-tuned", 0, 7.5, 13.0)]
    summary = run.summarise(boots, ["guest-agent", "floor-tuned"])
    text = run.table_since_systemd(summary, ["guest-agent", "floor-tuned"])
    assert "| systemd started (seconds from QEMU start) | 7.5 (7.0-8.0) | 7.5 |" in text
    assert "| DHCP lease | 5.5 (5.0-6.0) | 5.5 |" in text
    assert "Ready" not in text  # rows no variant has are left out
