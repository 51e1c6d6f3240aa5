"""A fleet of agents against one rate-limited fake IMDS: every agent provisions, retries spread.

The figures for 200 agents (with and without jitter) come from `python -m bench.fleet`.
"""

from __future__ import annotations

from bench.fleet import run_fleet


def test_a_throttled_fleet_provisions_with_spread_retries() -> None:
    r = run_fleet(agents=60, rate=40.0)
    assert r.provisioned == r.agents
    # Told `Retry-After: 1` together, the agents come back over about a second, not at once:
    # no 50 ms window holds even a third of the second tries (without jitter: most of them).
    assert r.second_peak_50ms < r.agents / 3
