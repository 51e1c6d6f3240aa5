from __future__ import annotations

import json

import pytest

from guest_agent.errors import UserDataInvalid
from guest_agent.timeline import Timeline


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
    assert [s["name"] for s in json.loads(doc)["stages"]] == ["fetch", "validate"]
