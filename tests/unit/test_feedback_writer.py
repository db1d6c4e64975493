"""Memory writer batch handling with fakes for Kafka and Redis: dead letters, idempotency, retries."""

from __future__ import annotations

import json
from collections import namedtuple

import numpy as np
import pytest

from serving.feedback_writer import MemoryWriter
from serving.mixing import ServedMix
from streams.errors import StoreUnavailable
from streams.kafka_io import KafkaConfig
from streams.schemas import FeedbackEvent

Record = namedtuple("Record", "topic partition offset key value")


class FakeFuture:
    def get(self, timeout=None):
        return None


class FakeProducer:
    def __init__(self):
        self.sent = []

    def send(self, topic, value=None, key=None, headers=None):
        self.sent.append((topic, value, dict(headers or [])))
        return FakeFuture()


class FakeLog:
    def __init__(self, fail: bool = False):
        self.applied: dict[str, object] = {}
        self.fail = fail
        self.forgotten: list[tuple[list[str], str | None]] = []

    def forget(self, event_ids, subject_id=None):
        self.forgotten.append((event_ids, subject_id))
        return sum(self.applied.pop(e, None) is not None for e in event_ids)

    def add_once(self, entries):
        if self.fail:
            raise StoreUnavailable("redis down")
        new = [e for e in entries if e.event_id not in self.applied]
        for e in new:
            self.applied[e.event_id] = e
        return len(new)


def _rec(offset: int, value: bytes | None) -> Record:
    return Record("driftserve.feedback", 0, offset, b"d", value)


def _good(i: int) -> bytes:
    return json.dumps({"event_id": f"e{i}", "text": f"text {i}", "label": "a"}).encode()


@pytest.fixture()
def writer(tiny_encoder):
    return MemoryWriter(tiny_encoder, KafkaConfig(), FakeLog(), FakeProducer())


def test_bad_messages_are_dead_lettered_with_reason_and_origin(writer):
    records = [
        _rec(0, _good(0)),
        _rec(1, b"{oops"),
        _rec(2, b"\xff\xfe"),
        _rec(3, b'{"text": "x"}'),
        _rec(4, _good(1)),
    ]
    counts = writer.handle(records)
    assert counts == {"applied": 2, "duplicate": 0, "dead_lettered": 3, "forgotten": 0}
    reasons = [h["driftserve.reason"] for _, _, h in writer._producer.sent]
    assert reasons == [b"bad_json", b"bad_utf8", b"missing_field"]
    topic, value, headers = writer._producer.sent[0]
    assert topic == "driftserve.dlq" and value == b"{oops"
    assert (
        headers["driftserve.origin.offset"] == b"1"
        and headers["driftserve.origin.topic"] == b"driftserve.feedback"
    )


def test_redelivery_is_applied_once(writer):
    writer.handle([_rec(0, _good(0)), _rec(1, _good(1))])
    counts = writer.handle([_rec(0, _good(0)), _rec(1, _good(1)), _rec(2, _good(2))])
    assert counts == {"applied": 1, "duplicate": 2, "dead_lettered": 0, "forgotten": 0}
    assert sorted(writer.log.applied) == ["e0", "e1", "e2"]


def test_store_failure_raises_so_nothing_is_committed(tiny_encoder):
    writer = MemoryWriter(tiny_encoder, KafkaConfig(), FakeLog(fail=True), FakeProducer())
    with pytest.raises(StoreUnavailable):
        writer.handle([_rec(0, _good(0))])


class FakeRequestEmbeddings:
    def __init__(self, known, mixes=None, fail: bool = False):
        self.known = known
        self.mixes = mixes or {}
        self.fail = fail
        self.calls = 0

    def get_many(self, request_ids, dim):
        self.calls += 1
        if self.fail:
            raise StoreUnavailable("redis down")
        return [self.known.get(r) for r in request_ids], [self.mixes.get(r) for r in request_ids]


def test_forget_after_add_in_the_same_batch(writer):
    forget = json.dumps({"forget_id": "f1", "event_ids": ["e0"]}).encode()
    records = [_rec(0, _good(0)), Record("driftserve.forget", 0, 0, None, forget)]
    counts = writer.handle(records)
    assert counts["applied"] == 1 and counts["forgotten"] == 1
    assert writer.log.forgotten == [(["e0"], None)]


def test_invalid_forget_is_dead_lettered(writer):
    records = [Record("driftserve.forget", 0, 5, None, json.dumps({"forget_id": "f"}).encode())]
    assert writer.handle(records)["dead_lettered"] == 1
    assert writer._producer.sent[0][2]["driftserve.reason"] == b"invalid_field"


def test_request_id_fast_path_skips_encoding(tiny_encoder):
    cached = np.ones(tiny_encoder.dim, dtype=np.float32) / np.sqrt(tiny_encoder.dim)
    cache = FakeRequestEmbeddings({"r1": cached})
    writer = MemoryWriter(tiny_encoder, KafkaConfig(), FakeLog(), FakeProducer(), cache)
    events = [
        FeedbackEvent(event_id="a", text="hello", label="x", request_id="r1"),
        FeedbackEvent(event_id="b", text="hello", label="x", request_id="unknown"),
        FeedbackEvent(event_id="c", text="hello", label="x"),
    ]
    keys, _ = writer.keys_for(events)
    assert cache.calls == 1  # one round trip for the named requests
    np.testing.assert_allclose(keys[0], cached)
    np.testing.assert_allclose(keys[1], tiny_encoder.encode(["hello"])[0], atol=1e-5)
    np.testing.assert_allclose(keys[2], keys[1], atol=1e-5)


def test_entries_carry_what_head_and_memory_said_to_the_labelled_request(tiny_encoder):
    served = ServedMix("v1", {"billing": 0.7, "bug": 0.3}, {"billing": 0.2, "bug": 0.8}).to_json().encode()
    cache = FakeRequestEmbeddings({}, mixes={"r1": served, "r2": b"not json"})
    log = FakeLog()
    writer = MemoryWriter(tiny_encoder, KafkaConfig(), log, FakeProducer(), cache)
    rows = [
        {"event_id": "a", "text": "charged twice", "label": "bug", "request_id": "r1"},
        {"event_id": "b", "text": "charged twice", "label": "bug", "request_id": "r2"},  # unreadable mix
        {"event_id": "c", "text": "charged twice", "label": "new-label", "request_id": "r1"},
        {"event_id": "d", "text": "charged twice", "label": "bug"},  # names no request
    ]
    writer.handle([_rec(i, json.dumps(r).encode()) for i, r in enumerate(rows)])
    assert cache.calls == 1  # keys and mix records in one round trip
    mixes = {k: e.mix for k, e in log.applied.items()}
    assert mixes == {
        "a": ("v1", 0.3, 0.8, 0.0, 0.0, 0.0),
        "b": None,
        "c": ("v1", 0.0, 0.0, 0.0, 0.0, 0.0),
        "d": None,
    }
    # Redis failing on the request read costs the calibration (the text is encoded), never the entry.
    failing = MemoryWriter(
        tiny_encoder, KafkaConfig(), FakeLog(), FakeProducer(), FakeRequestEmbeddings({}, fail=True)
    )
    assert failing.handle([_rec(0, json.dumps(rows[0]).encode())])["applied"] == 1
    assert failing.log.applied["a"].mix is None
