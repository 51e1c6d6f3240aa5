from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from guest_agent import timeline
from guest_agent.errors import UserDataInvalid
from guest_agent.timeline import Timeline

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20
)


@given(_values)
def test_dumps_writes_what_json_dumps_writes(value: object) -> None:
    """timeline.json without the json module: the same text as json.dumps(indent=2)."""
    assert timeline.dumps(value) == json.dumps(value, indent=2)


def test_a_real_timeline_round_trips() -> None:
    ticks = iter(float(i) / 8 for i in range(100))
    tl = Timeline(clock=lambda: next(ticks))
    with tl.stage("fetch"):
        pass
    with pytest.raises(UserDataInvalid), tl.stage("validate"):
        raise UserDataInvalid("user-data is not valid YAML")
    tl.mark("ready")
    doc = tl.to_json()
    assert doc.endswith(b"\n") and json.loads(doc) == tl.to_dict()
    assert doc == json.dumps(tl.to_dict(), indent=2).encode() + b"\n"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), object()])
def test_dumps_refuses_what_is_not_json(bad: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        timeline.dumps({"x": bad})
