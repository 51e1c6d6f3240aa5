"""Many agents against one rate-limited fake IMDS on 127.0.0.1: are the retries spread?

    .venv/bin/python -m bench.fleet [--agents 200] [--rate 40]

Each agent is a thread running the real fetch loop (`boot.fetch_user_data`, the real clock
and sleep).  The fake Azure IMDS serves `--rate` requests per second (a token bucket) and
answers the rest `429 Retry-After: 1`, the way a throttled IMDS does.  Printed: how many agents
got their user-data, requests per agent, and how the agents' first retries are spread in time,
with the jitter on and, for comparison, off (rand = 0: what every agent did before).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from guest_agent import boot, transport
from guest_agent import log as agent_log
from guest_agent.clouds import FetchContext
from guest_agent.clouds.http import request, require_body, retry_or_fail
from guest_agent.config import Config
from guest_agent.transport import urandom_unit
from tests import caa
from tests.fakecloud import imds
from tests.fakecloud.server import FakeServer, Reply, Request, Script

BURST = 10


class RateLimited:
    """A token bucket in front of the fake IMDS: `rate` per second, bursts of BURST."""

    def __init__(self, inner: Callable[[Request], Reply], rate: float) -> None:
        self.inner = inner
        self.rate = rate
        self.tokens = float(BURST)
        self.at = time.monotonic()
        self.lock = threading.Lock()
        self.first_by_agent: dict[str, list[float]] = {}

    def __call__(self, req: Request) -> Reply:
        agent = req.header("x-agent") or "?"
        with self.lock:
            self.first_by_agent.setdefault(agent, []).append(req.t_mono)
            now = time.monotonic()
            self.tokens = min(float(BURST), self.tokens + (now - self.at) * self.rate)
            self.at = now
            if self.tokens < 1.0:
                return Reply(429, "Too Many Requests", {"Retry-After": "1"})
            self.tokens -= 1.0
        return self.inner(req)


@dataclass
class FleetResult:
    agents: int
    provisioned: int
    requests: int
    second_spread_s: float  # max - min arrival time of the agents' second requests
    second_stdev_s: float
    second_peak_50ms: int  # most second requests inside any 50 ms window
    all_done_s: float


def run_fleet(agents: int, rate: float, rand: Callable[[], float] = urandom_unit) -> FleetResult:
    ud = caa.cloud_config()
    with tempfile.TemporaryDirectory() as root:
        limiter = RateLimited(imds.azure(ud, Script()), rate)
        srv = FakeServer("imds", limiter).start()
        try:
            c = Config()
            cfg = dataclasses.replace(
                c,
                provider="azure",
                azure=dataclasses.replace(c.azure, imds_url=srv.url),
                fetch=dataclasses.replace(c.fetch, deadline_s=120.0),
            )
            done: list[bytes] = []

            def agent(i: int) -> None:
                # Each agent tags its requests so the server can tell them apart.
                done.append(_fetch_tagged(cfg, root, boot.Deps(rand=rand), {"Metadata": "true", "X-Agent": str(i)}))

            t0 = time.monotonic()
            threads = [threading.Thread(target=agent, args=(i,)) for i in range(agents)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.monotonic() - t0
        finally:
            srv.stop()
    seconds = sorted(ts[1] for ts in limiter.first_by_agent.values() if len(ts) > 1)
    peak = max((sum(1 for u in seconds if s <= u < s + 0.05) for s in seconds), default=0)
    return FleetResult(
        agents=agents,
        provisioned=sum(1 for d in done if d == ud),
        requests=sum(len(v) for v in limiter.first_by_agent.values()),
        second_spread_s=(seconds[-1] - seconds[0]) if seconds else 0.0,
        second_stdev_s=statistics.pstdev(seconds) if seconds else 0.0,
        second_peak_50ms=peak,
        all_done_s=elapsed,
    )


def _fetch_tagged(cfg: Config, root: str, deps: boot.Deps, headers: dict[str, str]) -> bytes:
    """boot.fetch_user_data with an extra request header (the fleet's agent id)."""
    from guest_agent.clouds import azure as azure_imds

    ctx = FetchContext(
        cfg=cfg,
        root=root,
        deadline=transport.Deadline(cfg.fetch.deadline_s, deps.clock),
        backoff=transport.Backoff(cfg.fetch.backoff_initial_s, cfg.fetch.backoff_max_s, cfg.fetch.retry_after_max_s),
    )

    def attempt() -> bytes:
        resp = request(ctx, "GET", cfg.azure.imds_url + cfg.azure.user_data_path, headers=headers)
        if resp.status != 200:
            raise retry_or_fail(resp, "Azure IMDS userData")
        return azure_imds.parse_user_data(require_body(resp, "Azure IMDS userData"))

    return transport.retry_until(
        attempt, what="fleet fetch", deadline=ctx.deadline, backoff=ctx.backoff, sleep=deps.sleep, rand=deps.rand
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--rate", type=float, default=40.0)
    args = ap.parse_args()
    agent_log.setup(agent_log.ERROR, journal=False)  # one "retrying" line per agent is noise here
    print(f"{args.agents} agents, one fake IMDS serving {args.rate:.0f} req/s (burst {BURST}), else 429 Retry-After: 1")
    cols = ("provisioned", "requests", "2nd-try spread", "stdev", "peak/50ms", "all done")
    print(f"{'jitter':8} {cols[0]:>11} {cols[1]:>9} {cols[2]:>15} {cols[3]:>8} {cols[4]:>10} {cols[5]:>9}")
    for name, rand in (("on", urandom_unit), ("off", lambda: 0.0)):
        r = run_fleet(args.agents, args.rate, rand)
        print(
            f"{name:8} {r.provisioned:>7}/{r.agents:<3} {r.requests:>9} {r.second_spread_s:>13.3f} s"
            f" {r.second_stdev_s:>6.3f} s {r.second_peak_50ms:>10} {r.all_done_s:>7.2f} s"
        )


if __name__ == "__main__":
    main()
