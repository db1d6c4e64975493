from __future__ import annotations

import json

import pytest

from streams.errors import InvalidEvent
from streams.schemas import DEFAULT_DOMAIN, MAX_EVENT_BYTES, parse_feedback


def _raw(**fields) -> bytes:
    return json.dumps(fields).encode()


def test_valid_event_with_defaults():
    parsed = parse_feedback(_raw(event_id="e1", text="hello", label="a"))
    assert parsed.event.domain == DEFAULT_DOMAIN
    assert parsed.event.schema_version == 1
    assert parsed.unknown_fields == ()


def test_unknown_fields_are_ignored_and_reported():
    parsed = parse_feedback(_raw(event_id="e1", text="t", label="a", domain=None, extra=1, zz=2))
    assert parsed.unknown_fields == ("extra", "zz")
    assert parsed.event.domain == DEFAULT_DOMAIN


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty"),
        (b"{not json", "bad_json"),
        (b"\xff\xfe\x00garbage", "bad_utf8"),
        (b"[1, 2]", "not_an_object"),
        (_raw(text="t", label="a"), "missing_field"),
        (_raw(event_id="e", text="t"), "missing_field"),
        (_raw(event_id="e", text="   ", label="a"), "invalid_field"),
        (_raw(event_id="e", text="t", label="a", schema_version=99), "unsupported_schema_version"),
        (b"x" * (MAX_EVENT_BYTES + 1), "oversize"),
    ],
)
def test_invalid_events_carry_a_reason(raw, reason):
    with pytest.raises(InvalidEvent) as info:
        parse_feedback(raw)
    assert info.value.reason == reason


def test_roundtrip_bytes():
    event = parse_feedback(_raw(event_id="e1", text="hé", label="a", domain="d")).event
    assert parse_feedback(event.to_bytes()).event == event
