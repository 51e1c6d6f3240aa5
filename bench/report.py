"""Time-to-Ready on the critical path, against the fake wireserver on 127.0.0.1.

    .venv/bin/python -m bench.report [--iterations 30] [--rtt-ms 0 2]

For each endpoint flavour, measures the wall time from calling `AzureFabric.report_ready()`
(KVP record written and fsync'd, then the report) until the fake wireserver receives the
Ready POST, and the HTTP round trips the report made.  `--rtt-ms` delays every answer of
the fake to stand in for the real wireserver's latency (loopback alone hides what a round
trip costs).  Each iteration uses a fresh AzureFabric (new connection, flavour unknown),
as at boot.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from guest_agent.azure.fabric import AzureFabric
from guest_agent.config import AzureConfig
from tests.fakecloud.wireserver import FakeWireserver

SCENARIOS = {
    "json": "JSON /provisioning/health",
    "xml": "XML: JSON 404, GET goal state, POST health",
}


@dataclass
class Row:
    scenario: str
    rtt_ms: float
    round_trips: int
    median_ms: float
    p90_ms: float
    min_ms: float


def measure(scenario: str, rtt_ms: float, iterations: int) -> Row:
    times: list[float] = []
    trips: set[int] = set()
    with tempfile.TemporaryDirectory() as tmp, FakeWireserver(json_endpoint=scenario == "json") as ws:
        ws.latency_s = rtt_ms / 1000.0
        root = Path(tmp)
        (root / "var/lib/hyperv").mkdir(parents=True)
        cfg = AzureConfig(wireserver_url=ws.url, ready_deadline_s=30.0)
        for _ in range(iterations):
            fabric = AzureFabric(cfg, root=str(root))
            n_before = len(ws.accepted())
            t0 = time.monotonic()
            res = fabric.report_ready({"fetch": 1.0})
            if res is None or len(ws.accepted()) != n_before + 1:
                raise RuntimeError(f"{scenario}: no Ready reached the fake wireserver")
            times.append(ws.accepted()[-1].request.t_mono - t0)
            trips.add(res.round_trips)
        (root / "var/lib/hyperv/.kvp_pool_1").unlink()
    if len(trips) != 1:
        raise RuntimeError(f"{scenario}: round trips varied: {sorted(trips)}")
    ms = sorted(t * 1000 for t in times)
    return Row(
        scenario,
        rtt_ms,
        trips.pop(),
        statistics.median(ms),
        ms[min(len(ms) - 1, int(len(ms) * 0.9))],
        ms[0],
    )


def run(iterations: int = 30, rtts_ms: tuple[float, ...] = (0.0, 2.0)) -> list[Row]:
    # Warm up: the imports and the fake once, outside the measurement.
    measure("json", 0.0, 2)
    return [measure(s, rtt, iterations) for rtt in rtts_ms for s in SCENARIOS]


def table(rows: list[Row]) -> str:
    head = f"{'scenario':<14} {'rtt ms':>6} {'round trips':>11} {'median ms':>9} {'p90 ms':>7} {'min ms':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        stats = f"{r.median_ms:>9.2f} {r.p90_ms:>7.2f} {r.min_ms:>7.2f}"
        lines.append(f"{r.scenario:<14} {r.rtt_ms:>6.1f} {r.round_trips:>11} {stats}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 2.0])
    args = p.parse_args(argv)
    print("time from report_ready() to the fake wireserver receiving Ready (KVP write + fsync included)")
    print(table(run(args.iterations, tuple(args.rtt_ms))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
