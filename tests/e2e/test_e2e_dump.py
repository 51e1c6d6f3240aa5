"""The in-guest e2e-dump script's pure parts (image/overlay/usr/local/libexec/e2e-dump): when the
stand-in units count as settled, and when the restart probe's outcome is final."""

from __future__ import annotations

from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path
from types import ModuleType

DUMP = Path(__file__).resolve().parents[2] / "image" / "overlay" / "usr" / "local" / "libexec" / "e2e-dump"


def load() -> ModuleType:
    loader = SourceFileLoader("e2e_dump", str(DUMP))
    spec = spec_from_loader(loader.name, loader)
    assert spec is not None
    mod = module_from_spec(spec)
    loader.exec_module(mod)
    return mod


dump = load()


def test_recorded_pids_takes_complete_records_only() -> None:
    records = {
        "kata-agent": [{"name": "kata-agent", "pid": 812}],
        "api-server-rest": [{"unparsed": '{"name": "api-server-rest", "pi'}, {"pid": "9"}],
        "attestation-agent": [{"pid": 700}, {"pid": 733}],
    }
    assert dump.recorded_pids(records) == {812, 700, 733}


def test_an_active_unit_is_settled_only_once_its_process_recorded() -> None:
    # The race: a Type=simple unit is active from fork(), before the stand-in writes its record.
    shown = {"kata-agent.service": {"ActiveState": "active", "MainPID": "812"}}
    pending = dump.unsettled(shown, set())
    assert list(pending) == ["kata-agent.service"]
    assert "no record from its main process (PID 812)" in pending["kata-agent.service"]
    # A record from another process (an earlier run, kata-agent-clean) does not count.
    assert list(dump.unsettled(shown, {811})) == ["kata-agent.service"]
    assert dump.unsettled(shown, {812}) == {}


def test_failed_is_settled_and_anything_else_waits() -> None:
    shown = {
        "kata-agent.service": {"ActiveState": "failed", "MainPID": "0"},
        "api-server-rest.service": {"ActiveState": "inactive", "MainPID": "0"},
        "x.service": {"ActiveState": "activating", "MainPID": "0"},
        "y.service": {"error": "0 blocks for 3 units"},
        "z.service": {"ActiveState": "active", "MainPID": "0"},
    }
    pending = dump.unsettled(shown, {0})
    assert pending["api-server-rest.service"] == "inactive"
    assert pending["x.service"] == "activating"
    assert pending["y.service"] == "0 blocks for 3 units"
    assert "z.service" in pending  # no main process: no record can be its
    assert "kata-agent.service" not in pending


def test_job_units_parses_list_jobs() -> None:
    out = "123 e2e-dep-w.service   start waiting\n121 e2e-flaky-w.service restart running\nNo jobs running.\n\n"
    assert dump.job_units(out) == {"e2e-dep-w.service", "e2e-flaky-w.service"}
    assert dump.job_units("") == set()


def test_restart_outcome_is_final_when_restarted_and_no_job_is_left() -> None:
    units = {"f.service", "d.service"}
    restarted = {"f.service": {"ActiveState": "active", "NRestarts": "1"}}
    assert dump.restart_done(restarted, set(), units)
    # The dependent's start job, queued with the restart, has not run yet.
    assert not dump.restart_done(restarted, {"d.service"}, units)
    assert dump.restart_done(restarted, {"other.service"}, units)
    # Still failing (auto-restart pending), or active without the restart yet: not final.
    assert not dump.restart_done({"f.service": {"ActiveState": "activating", "NRestarts": "0"}}, set(), units)
    assert not dump.restart_done({"f.service": {"ActiveState": "active", "NRestarts": "0"}}, set(), units)
