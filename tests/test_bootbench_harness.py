"""The boot benchmark's harness (bench/boot/run.py): its contention check (another QEMU process
during a boot makes it measure the boot again; this boot's own forks, guestfwd relays before they
exec, must not count, whoever their parent is), and the figures counted from systemd's start."""

from __future__ import annotations

import os
import re
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


def test_split_rows_separate_the_agents_gain_from_the_tuning() -> None:
    ready = {"guest-agent": 7.0, "guest-agent-deb": 7.7, "caa-chain": 12.0, "caa-chain-tuned": 8.0}
    lease = {"guest-agent": 6.0, "guest-agent-deb": 6.2, "floor-tuned": 5.0, "floor-stock": 10.0}
    lease |= {"caa-chain": 10.5, "caa-chain-tuned": 5.5}
    boots = []
    for v in lease:
        fig: dict[str, float | None] = {"dhcp": lease[v], "ready": ready.get(v)}
        boots.append(run.Boot(v, 0, figures=fig))
    variants = list(lease)
    sizes = {"guest-agent": 283.5, "guest-agent-deb": 283.2, "floor-tuned": 273.5, "floor-stock": 273.5}
    sizes |= {"caa-chain": 273.6, "caa-chain-tuned": 273.6}
    text = run.table_splits(run.summarise(boots, variants), sizes, variants)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ") for line in text.splitlines()[2:]}
    assert list(rows) == [f"{a} / {b}" for a, b, _ in run.SPLITS]
    # columns: pair, what, lease, Ready, APF, multi-user, CPU, peak memory, memory after boot, rootfs
    assert rows["guest-agent / caa-chain"][3] == "0.58x (-5.0)"  # agent + tuning
    assert rows["guest-agent / caa-chain-tuned"][3] == "0.88x (-1.0)"  # the agent's own gain
    assert rows["caa-chain-tuned / caa-chain"][3] == "0.67x (-4.0)"  # the tuning under CAA's chain
    assert rows["floor-tuned / floor-stock"][2] == "0.50x (-5.0)"  # the tuning alone
    assert rows["floor-tuned / floor-stock"][3] == "-"  # no Ready without an agent
    assert rows["guest-agent-deb / guest-agent"][3] == "1.10x (+0.7)"  # the package route
    assert rows["guest-agent-deb / floor-tuned"][-1].rstrip(" |") == "1.04x (+9.7)"
    assert rows["guest-agent / floor-tuned"][-1].rstrip(" |") == "1.04x (+10.0)"


def test_split_rows_only_for_pairs_in_the_run() -> None:
    boots = [run.Boot(v, 0, figures={"dhcp": 5.0}) for v in ("guest-agent", "caa-chain")]
    text = run.table_splits(run.summarise(boots, ["guest-agent", "caa-chain"]), {}, ["guest-agent", "caa-chain"])
    assert [line.split(" | ")[0] for line in text.splitlines()[2:]] == ["| guest-agent / caa-chain"]
    assert run.table_splits(run.summarise(boots[:1], ["guest-agent"]), {}, ["guest-agent"]) == ""


def test_make_bench_boot_builds_the_variants_the_run_boots() -> None:
    """The Makefile's BENCH_VARIANTS, image/disk-budget.sh's and run.py's default list are the same, and
    each variant has a name, a floor (but the floors) and its provisioning services."""
    repo = Path(run.__file__).resolve().parents[2]
    make = re.search(r"^BENCH_VARIANTS := (.*)$", (repo / "Makefile").read_text(), re.M)
    budget = re.search(r"^BENCH_VARIANTS=\((.*)\)$", (repo / "image" / "disk-budget.sh").read_text(), re.M)
    assert make is not None and budget is not None
    assert make.group(1).split() == budget.group(1).split() == list(run.DEFAULT_VARIANTS)
    for v in run.DEFAULT_VARIANTS:
        assert v in run.NAMES and v in run.PROVISIONING
        assert (v in run.FLOOR_OF) != v.startswith("floor-")
    for a, b, _ in run.SPLITS:
        assert a in run.DEFAULT_VARIANTS and b in run.DEFAULT_VARIANTS


def test_docs_carry_the_split_table_between_the_markers(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- bench-boot:begin old -->\nold\n<!-- bench-boot:end -->\n## Kept\n")
    machine = {"cpu": "c", "cores": "2", "memory_gib": "1", "os": "o", "kernel": "k", "qemu": "q"}
    result = {"date": "d", "runs": 1, "order": ["guest-agent"], "variants": ["guest-agent"], "total_s": 60.0}
    result |= {"machine": machine, "command": "make bench-boot"}
    run.write_docs(result, "T1", "T2", "| split |", "- goal", doc)
    text = doc.read_text()
    assert "\nT2\n\nWhat the tuning and the install route account for" in text
    assert "\n| split |\n\nGoals" in text and "old" not in text and text.endswith("## Kept\n")
    run.write_docs(result, "T1", "T2", "", "- goal", doc)
    assert "(no pair of the variants run)" in doc.read_text()


def test_only_the_floors_are_settled_before_any_report() -> None:
    """A variant with provisioning services is measured once its Ready arrived; a floor at once."""
    for v in [*run.DEFAULT_VARIANTS, "guest-agent+x", "floor-tuned+x"]:
        assert run.settled_when(v)([]) == (not run.PROVISIONING[run.kind(v)]), v
