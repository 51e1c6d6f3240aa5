"""The systemd side: `make install` lays out units, drop-ins and the preset; every service we ship
passes `systemd-analyze verify` and stays within its `systemd-analyze security` exposure budget.

Both run offline against the installed tree (--root), so drop-ins count: netns@.service.d, for
one, takes the unit out of the default dependencies, which changes its score."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
UNITDIR = "usr/lib/systemd/system"

# Exposure budgets (systemd-analyze's 0-10 scale): the agent, which parses untrusted input, at most
# 2.0; the small network units at most 4.0.
BUDGET = {"guest-agent.service": 2.0, "guest-agent-imds-nat.service": 4.0, "netns@podns.service": 4.0}

# cloud-api-adaptor's units our drop-ins extend (stand-ins here, so verify parses the drop-ins).
CAA_UNITS = (
    "afterburn-checkin.service",
    "agent-protocol-forwarder.service",
    "attestation-agent.service",
    "azure-ready.service",
    "confidential-data-hub.service",
    "process-user-data.path",
    "process-user-data.service",
    "setup-nat-for-imds.service",
)


def install(dest: Path, *args: str) -> None:
    subprocess.run(["make", "-s", "-C", str(REPO), "install", f"DESTDIR={dest}", *args], check=True, timeout=60)


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_make_install_layout(tmp_path: Path) -> None:
    install(tmp_path, "PREFIX=/usr")
    drop_ins = [f"{UNITDIR}/{u}.d/50-guest-agent.conf" for u in (*CAA_UNITS, "netns@.service")]
    assert tree(tmp_path) == sorted(
        [
            "usr/lib/systemd/system-preset/10-guest-agent.preset",
            "usr/lib/systemd/catalog/guest-agent.catalog",
            "usr/share/man/man8/guest-agent.8",
            f"{UNITDIR}/guest-agent.service",
            f"{UNITDIR}/guest-agent-imds-nat.service",
            f"{UNITDIR}/netns@.service",
            *drop_ins,
        ]
    )
    for name in tree(tmp_path):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    unit = (tmp_path / UNITDIR / "guest-agent.service").read_text()
    assert "ExecStart=/usr/local/bin/guest-agent run\n" in unit  # pip's script location by default


def test_the_agent_starts_before_udev_and_reads_disks_of_any_driver() -> None:
    """systemd resolves DeviceAllow=<class> through /proc/devices when the unit starts, so the unit
    names disks by type (`block-*`, no lookup) rather than by the class of a driver that udev's
    coldplug may load later; the TPM's class is the core's, registered at boot.  The unit starts
    after systemd-modules-load.service (an image's own lists), not after udev's coldplug, and
    ships no module list of its own (loading one delayed udevd and the lease)."""
    unit = unit_lines(REPO / "units/guest-agent.service")
    devices = {ln.split("=", 1)[1] for ln in unit if ln.startswith("DeviceAllow=")}
    assert devices == {"char-tpm rw", "block-* r"}
    assert "DevicePolicy=closed" in unit
    after = " ".join(ln.split("=", 1)[1] for ln in unit if ln.startswith("After=")).split()
    assert "systemd-modules-load.service" in after
    assert "systemd-udev-trigger.service" not in after
    assert "PrivateTmp=yes" not in unit  # it would order the agent after systemd-tmpfiles-setup.service
    assert not list(REPO.glob("units/*modules-load*"))


def test_the_agent_runs_at_the_default_cpu_priority() -> None:
    """No Nice=, no LimitNICE=, no setpriority(2) in the filter: the agent neither starts low nor
    raises itself (docs/boot-placement.md)."""
    unit = unit_lines(REPO / "units/guest-agent.service")
    assert not [ln for ln in unit if ln.startswith(("Nice=", "LimitNICE=", "CPUSchedulingPolicy="))]
    assert not [ln for ln in unit if ln.startswith("SystemCallFilter=") and "setpriority" in ln]


def test_make_install_prefix_and_bindir(tmp_path: Path) -> None:
    install(tmp_path, "PREFIX=/opt/ga", "BINDIR=/opt/ga/venv/bin")
    unit = (tmp_path / "opt/ga/lib/systemd/system/guest-agent-imds-nat.service").read_text()
    assert "ExecStart=/opt/ga/venv/bin/guest-agent netns imds-nat\n" in unit
    assert (tmp_path / "opt/ga/lib/systemd/system-preset/10-guest-agent.preset").is_file()


def executables(root: Path, *paths: str) -> None:
    """Stand-ins for the programs the units run (verify checks that ExecStart= names one)."""
    for exe in paths:
        (root / exe).parent.mkdir(parents=True, exist_ok=True)
        (root / exe).write_text("#!/bin/sh\n")
        (root / exe).chmod(0o755)


def verify(root: Path, *units: str) -> tuple[int, str]:
    done = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", "--man=no", *units],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """An installed tree with stand-ins for the executables and for CAA's units."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze")
    install(tmp_path, "PREFIX=/usr")
    executables(tmp_path, "usr/local/bin/guest-agent", "usr/bin/ip", "usr/bin/nsenter", "usr/local/bin/caa-standin")
    for unit in CAA_UNITS:
        body = (
            "[Path]\nPathExists=/run/x\n"
            if unit.endswith(".path")
            else "[Service]\nExecStart=/usr/local/bin/caa-standin\n"
        )
        # No default dependencies: the tree has no sysinit.target to pull in.
        (tmp_path / UNITDIR / unit).write_text("[Unit]\nDefaultDependencies=no\n" + body)
    return tmp_path


def test_units_verify(image_root: Path) -> None:
    # Unknown keys and bad values are only warnings (exit 0): any output at all fails the test.
    assert verify(image_root, *BUDGET, *CAA_UNITS) == (0, "")


def exposure(root: Path, unit: str) -> float:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", f"--root={root}", "--no-pager", unit],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in done.stderr:
        pytest.skip("systemd-analyze has no --offline (systemd < 250)")
    m = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d)", done.stdout)
    assert m, done.stdout + done.stderr
    return float(m.group(1))


def test_every_service_we_ship_has_a_budget() -> None:
    shipped = {p.name.replace("@.", "@podns.") for p in (REPO / "units").glob("*.service")}
    assert shipped == set(BUDGET)


@pytest.mark.parametrize("unit", sorted(BUDGET))
def test_security_exposure(image_root: Path, unit: str) -> None:
    assert exposure(image_root, unit) <= BUDGET[unit]


def unit_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def test_kill_switch_is_consistent() -> None:
    """guest-agent=disabled skips our units and lets exactly the CAA units we replace run."""
    units = REPO / "units"
    for name in ("guest-agent.service", "guest-agent-imds-nat.service"):
        assert "ConditionKernelCommandLine=!guest-agent=disabled" in unit_lines(units / name), name
    replaced = sorted(
        p.parent.name[: -len(".d")]
        for p in units.glob("*.d/50-guest-agent.conf")
        if "ConditionKernelCommandLine=guest-agent=disabled" in unit_lines(p)
    )
    assert replaced == [
        "afterburn-checkin.service",
        "azure-ready.service",
        "process-user-data.path",
        "process-user-data.service",
        "setup-nat-for-imds.service",
    ]
    # netns@ is shared with CAA's kata-agent and api-server-rest: never switched off.
    assert not any("Condition" in ln for ln in unit_lines(units / "netns@.service"))


# afterburn's check-in unit as Fedora/CoreOS ship it (coreos/afterburn 790aa94b,
# systemd/afterburn-checkin.service: it runs only where the kernel command line names the platform),
# and CAA's override of it (cloud-api-adaptor fbdde756, podvm/mkosi.images/system/mkosi.skeleton/
# usr/lib/systemd/system/afterburn-checkin.service.d/10-override.conf): the condition list reset,
# then Azure only, with the provider given on the command line.
AFTERBURN_CHECKIN = """\
[Unit]
ConditionKernelCommandLine=|ignition.platform.id=azure
ConditionKernelCommandLine=|ignition.platform.id=azurestack
After=network.target multi-user.target
[Service]
Type=oneshot
ExecStart=/usr/bin/afterburn --cmdline --check-in
RemainAfterExit=yes
"""
CAA_AFTERBURN_OVERRIDE = """\
[Unit]
ConditionKernelCommandLine=
ConditionVirtualization=microsoft
[Service]
ExecStart=
ExecStart=/usr/bin/afterburn --provider=azure --check-in
"""
# Test only: stands for "on Azure" here (systemd detects a container or another hypervisor); like
# CAA's override it resets every condition before it, and sorts before our 50-guest-agent.conf.
ON_AZURE = "[Unit]\nConditionVirtualization=\n"


def afterburn_root(tmp_path: Path, *, on_azure: bool, ours: bool = True) -> Path:
    """CAA's afterburn-checkin (afterburn's unit + CAA's override) with or without our drop-in."""
    if ours:
        install(tmp_path, "PREFIX=/usr")
    unit = tmp_path / UNITDIR / "afterburn-checkin.service"
    (unit.parent / "afterburn-checkin.service.d").mkdir(parents=True, exist_ok=True)
    unit.write_text(AFTERBURN_CHECKIN)
    (unit.parent / "afterburn-checkin.service.d/10-override.conf").write_text(CAA_AFTERBURN_OVERRIDE)
    if on_azure:
        (unit.parent / "afterburn-checkin.service.d/20-test-on-azure.conf").write_text(ON_AZURE)
    executables(tmp_path, "usr/bin/afterburn")
    return tmp_path


def would_run(root: Path, unit: str, cmdline: str) -> tuple[bool, str]:
    """The unit's conditions, drop-ins included, evaluated offline against `cmdline` as the kernel
    command line (systemd reads $SYSTEMD_PROC_CMDLINE instead of /proc/cmdline)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze")
    done = subprocess.run(
        ["systemd-analyze", "condition", f"--root={root}", f"--unit={unit}"],
        env={**os.environ, "SYSTEMD_PROC_CMDLINE": cmdline},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "Unknown" in done.stderr and "condition" in done.stderr:
        pytest.skip("systemd-analyze has no condition verb (systemd < 243)")
    return done.returncode == 0, done.stdout + done.stderr


def test_afterburn_checkin_runs_on_azure_without_our_drop_in(tmp_path: Path) -> None:
    """The problem: on an image with afterburn, CAA's preset and override make it check in on Azure
    beside the agent."""
    assert would_run(afterburn_root(tmp_path, on_azure=True, ours=False), "afterburn-checkin.service", "")[0]


def test_afterburn_checkin_is_skipped_unless_the_kill_switch_is_set(tmp_path: Path) -> None:
    root = afterburn_root(tmp_path, on_azure=True)
    runs, out = would_run(root, "afterburn-checkin.service", "root=/dev/vda quiet")
    assert not runs and "ConditionKernelCommandLine=guest-agent=disabled failed" in out
    # guest-agent=disabled: CAA's unit is back, exactly as CAA configured it.
    runs, out = would_run(root, "afterburn-checkin.service", "root=/dev/vda guest-agent=disabled")
    assert runs, out


def test_afterburn_checkin_keeps_caas_own_conditions_under_the_kill_switch(tmp_path: Path) -> None:
    """Not on Azure, CAA's ConditionVirtualization=microsoft still decides, kill switch or not: our
    drop-in only adds a condition (it sorts after CAA's override, whose reset would drop it)."""
    root = afterburn_root(tmp_path, on_azure=False)
    runs, out = would_run(root, "afterburn-checkin.service", "guest-agent=disabled")
    assert "ConditionKernelCommandLine=guest-agent=disabled succeeded" in out
    if "ConditionVirtualization=microsoft succeeded" not in out:  # not on Hyper-V
        assert not runs, out


def test_a_drop_in_for_a_unit_the_image_lacks_is_harmless(tmp_path: Path) -> None:
    """Ubuntu has no afterburn: the installed drop-in names a unit that does not exist.  systemd loads
    no unit from a drop-in alone; verify of everything we ship says nothing, and nothing lists it."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze")
    install(tmp_path, "PREFIX=/usr")
    assert (tmp_path / UNITDIR / "afterburn-checkin.service.d/50-guest-agent.conf").is_file()
    assert not (tmp_path / UNITDIR / "afterburn-checkin.service").exists()
    executables(tmp_path, "usr/local/bin/guest-agent", "usr/bin/ip", "usr/bin/nsenter")
    assert verify(tmp_path, *BUDGET) == (0, "")
    listed = subprocess.run(
        ["systemctl", f"--root={tmp_path}", "list-unit-files", "--no-legend", "afterburn-checkin.service"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.stdout.strip() == ""
