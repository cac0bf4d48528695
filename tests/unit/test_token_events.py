"""The token's record of what was measured at enrolment (pcr_events): it round-trips, and a hostile one
is refused with one line (the header is anyone's to write)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_policy_and_token import sample_token

from unlocker.errors import CorruptError
from unlocker.measure import events
from unlocker.token import MAX_RECORDED_EVENTS, parse_token, parse_token_text

RECORD = {0: ["80000008:9f2c1e0a", "80000008:0b7d3e11", "00000004:df3f6198"], 7: []}


def with_events(value: Any) -> dict[str, Any]:
    doc = sample_token().to_json()
    doc["pcr_events"] = value
    return doc


def test_token_with_its_enrolments_events_round_trips() -> None:
    token = sample_token()
    token.pcr_events = RECORD
    again = parse_token_text(json.dumps(token.to_json()))
    assert again.pcr_events == RECORD
    assert "pcr_events" not in sample_token().to_json()  # none recorded: no field (older readers)


def test_the_limit_is_the_recorders() -> None:
    assert MAX_RECORDED_EVENTS == events.MAX_RECORDED_EVENTS


@pytest.mark.parametrize("value, message", [
    ([], "wrong type"),
    ({"4": ["80000003:61e79ca0"]}, "outside its PCR list"),
    ({"0": "80000003:61e79ca0"}, "pcr_events.0 is not a list"),
    ({"0": ["80000003:61E79CA0"]}, "pcr_events.0 is not a list"),
    ({"0": ["80000003-61e79ca0"]}, "pcr_events.0"),
    ({"0": ["80000003:61e79ca0ff"]}, "pcr_events.0"),
    ({"0": [3]}, "pcr_events.0"),
    ({"0": ["80000003:61e79ca0"] * (MAX_RECORDED_EVENTS + 1)}, "at most 64"),
    ({"00": []}, "outside its PCR list"),
])
def test_hostile_event_records_are_refused(value: Any, message: str) -> None:
    with pytest.raises(CorruptError, match=message) as caught:
        parse_token(with_events(value))
    assert "\n" not in caught.value.message
