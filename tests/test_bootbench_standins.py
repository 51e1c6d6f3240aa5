"""The caa-chain boot benchmark variant's stand-ins for CAA's programs (image/variants/overlay-caa-chain):
azure-ready's three requests against the benchmark's fake wireserver, and process-user-data's
write_files reader against a YAML parser on the benchmark's user-data."""

from __future__ import annotations

import subprocess
import sys
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path
from types import ModuleType

import yaml

from bench.boot.fabric import BenchWireserver
from tests.e2e import userdata

STANDINS = Path(__file__).resolve().parents[1] / "image/variants/overlay-caa-chain/usr/local/libexec/caa-chain"


def load(name: str) -> ModuleType:
    loader = SourceFileLoader(name.replace("-", "_"), str(STANDINS / name))
    spec = spec_from_loader(loader.name, loader)
    assert spec is not None
    mod = module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_azure_ready_reports_ready_with_caa_requests() -> None:
    wire = BenchWireserver(lambda _reports: True, 0.0).start()
    try:
        p = subprocess.run(
            [sys.executable, str(STANDINS / "azure-ready"), "-endpoint", wire.url], capture_output=True, timeout=60
        )
        assert p.returncode == 0, p.stderr
        reqs = list(wire.server.requests)
        assert [(r.method, r.raw_path) for r in reqs] == [
            ("GET", "/?comp=versions"),
            ("GET", "/machine/?comp=goalstate"),
            ("POST", "/machine?comp=health"),
        ]
        assert {r.header("x-ms-agent-name") for r in reqs} == {"azure-ready"}
        # CAA's azure-ready negotiates 2015-04-05, which the benchmark's wireserver lists as supported.
        assert [r.header("x-ms-version") for r in reqs] == [None, "2015-04-05", "2015-04-05"]
        [report] = wire.accepted()
        assert (report.flavour, report.state) == ("xml", "Ready")
    finally:
        wire.stop()


def test_azure_ready_fails_without_wireserver() -> None:
    wire = BenchWireserver(lambda _reports: True, 0.0).start()
    url = wire.url
    wire.stop()
    p = subprocess.run(
        [sys.executable, str(STANDINS / "azure-ready"), "-endpoint", url], capture_output=True, timeout=60
    )
    assert p.returncode == 1  # no retry inside: the unit's Restart=on-failure retries


def test_process_user_data_reads_write_files_as_yaml_does() -> None:
    pud = load("process-user-data")
    raw = userdata.valid()[0].decode()
    expected = [(w["path"], w["content"]) for w in yaml.safe_load(raw)["write_files"]]
    assert pud.parse_write_files(raw) == expected
