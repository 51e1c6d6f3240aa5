"""The hypothesis profile and helpers shared by the fuzz targets (test_fuzz_*.py).

Budget: `make test` runs each target with `GUEST_AGENT_FUZZ_EXAMPLES` examples (default 100,
derandomized, so CI is reproducible); `make fuzz` runs 5000 per target with a random seed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from guest_agent.errors import AgentError

EXAMPLES = int(os.environ.get("GUEST_AGENT_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,  # the machine is shared: wall time is not a property
    derandomize=EXAMPLES <= 200,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def only_agent_errors(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except AgentError:
        pass


def mutate(seed: bytes, edits: list[tuple[int, int, bytes]]) -> bytes:
    """Apply (position, delete count, insertion) edits: near-valid inputs reach deep code."""
    data = bytearray(seed)
    for pos, delete, insert in edits:
        p = pos % (len(data) + 1)
        data[p : p + delete] = insert
    return bytes(data)


EDITS = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 8), st.binary(max_size=8)), max_size=8)
