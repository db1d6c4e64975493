"""Feedback ingestion under faults, on the real broker and Redis: nothing lost, nothing applied twice."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import namedtuple

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from ops.settings import load_settings
from serving.encoder import model_fingerprint
from serving.feedback_writer import GROUP_ROLE, MemoryWriter
from serving.mixing import ServedMix
from streams.kafka_io import ensure_topics, make_producer
from streams.redis_store import MemoryLog, RequestEmbeddings, connect
from streams.schemas import MAX_EVENT_BYTES
from tests.conftest import wait_for
from tests.integration.procs import PersistentBroker, WriterProcess


@pytest.fixture()
def isolated(stack, tiny_model_dir, unique, tmp_path):
    """Settings on the session's broker and Redis, with topics and a Redis namespace of this test alone,
    and the tiny model (these tests are about delivery, not about the model)."""
    name = unique("iso")

    def make(create_topics: bool = True, **overrides):
        values = dict(
            kafka_bootstrap=stack.settings.kafka_bootstrap,
            redis_url=stack.settings.redis_url,
            feedback_topic=f"{name}.feedback",
            dlq_topic=f"{name}.dlq",
            rollout_topic=f"{name}.rollout",
            forget_topic=f"{name}.forget",
            redis_namespace=name,
            consumer_group_prefix=name,
            model_path=tiny_model_dir,
            max_length=32,
            state_dir=tmp_path / "state",
            kafka_session_timeout_ms=3000,
            kafka_heartbeat_interval_ms=1000,
            log_level="WARNING",
        )
        settings = load_settings(**(values | overrides))
        if create_topics:
            ensure_topics(settings.kafka())
        return settings

    return make


def _memory(settings, fingerprint: str) -> MemoryLog:
    rcfg = settings.redis()
    return MemoryLog(connect(rcfg), rcfg, fingerprint)


def _ids_in(log: MemoryLog) -> list[str]:
    ids, last = [], "0"
    while batch := log.read_since(last, count=5000):
        last = batch[-1][0]
        ids += [op.event_id for _, op in batch]
    return ids


def _committed_lag(settings, topic: str) -> int:
    probe = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=settings.kafka().group(GROUP_ROLE),
        enable_auto_commit=False,
    )
    try:
        parts = [TopicPartition(topic, p) for p in sorted(probe.partitions_for_topic(topic) or [])]
        ends = probe.end_offsets(parts)
        # max(0, ...): Tansu reports the last batch's base offset as the end offset, which can be below
        # a fully caught-up consumer's committed position; real Kafka reports the high watermark.
        return sum(max(0, ends[tp] - (probe.committed(tp) or 0)) for tp in parts)
    finally:
        probe.close()


def test_kill9_of_the_memory_writer_loses_nothing_and_applies_nothing_twice(isolated, tiny_model_dir):
    settings = isolated()
    n, kills = 10_000, 20
    fingerprint = model_fingerprint(tiny_model_dir)
    rcfg = settings.redis()
    # Feedback names the request it answers, so the writer takes keys from the request cache (the fast
    # path) and spends its time in Redis and Kafka, where the kills matter.
    cache = RequestEmbeddings(connect(rcfg), rcfg, fingerprint)
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(n, 32)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    for start in range(0, n, 1000):
        cache.put_many([(f"req-{i}", vecs[i]) for i in range(start, min(n, start + 1000))])

    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=5)

    def produce() -> None:
        for i in range(n):
            event = {
                "event_id": f"ev-{i}",
                "text": f"text {i}",
                "label": f"l{i % 3}",
                "domain": f"d{i % 4}",
                "request_id": f"req-{i}",
            }
            producer.send(settings.feedback_topic, key=f"d{i % 4}".encode(), value=json.dumps(event).encode())
            if i % 50 == 49:
                time.sleep(0.5)  # about 100 events/s: events keep flowing while the writer is killed
        producer.flush()

    flow = threading.Thread(target=produce)
    writer = WriterProcess(settings)
    log = _memory(settings, fingerprint)
    random.seed(7)
    started = time.monotonic()
    flow.start()
    try:
        for _ in range(kills):
            writer.start()
            # Kill at a random point *while it applies a batch*: wait until the memory grows, then a
            # random 0-20 ms more (inside the Redis writes, or between them and the offset commit).
            size = len(log)
            deadline = time.monotonic() + 5
            while len(log) == size and time.monotonic() < deadline:
                time.sleep(0.001)
            time.sleep(random.uniform(0.0, 0.02))
            writer.kill9()
        flow.join()
        writer.start()
        wait_for(lambda: len(log) >= n, 180, 0.2, f"{n} entries in the error memory")
        wait_for(lambda: _committed_lag(settings, settings.feedback_topic) == 0, 30, 0.2, "lag 0")
    finally:
        writer.stop()
        producer.close()
    ids = _ids_in(log)
    redeliveries = log.duplicates()
    print(
        f"kill -9 x{kills}: {len(ids)} entries, {len(set(ids))} unique, {redeliveries} redelivered "
        f"events refused, {time.monotonic() - started:.0f}s"
    )
    assert len(ids) == n, "an event was applied twice" if len(ids) > n else "an event was lost"
    assert set(ids) == {f"ev-{i}" for i in range(n)}
    assert redeliveries > 0, "no redelivery happened: the kills did not hit uncommitted work"
    assert writer.starts == kills + 1


def test_poison_messages_are_dead_lettered_and_valid_ones_all_arrive(isolated, tiny_model_dir):
    settings = isolated()
    valid, per_kind = 1_920, 20
    kinds = {
        "bad_json": b'{"event_id": "x", "text": ',
        "bad_utf8": b'{"event_id": "\xff\xfe", "text": "t", "label": "a"}',
        "oversize": json.dumps({"event_id": "big", "text": "x" * MAX_EVENT_BYTES, "label": "a"}).encode(),
        "missing_field": b'{"event_id": "no-label", "text": "t"}',
    }
    messages = [
        json.dumps({"event_id": f"ok-{i}", "text": f"valid text {i}", "label": "a"}).encode()
        for i in range(valid)
    ]
    messages += [raw for raw in kinds.values() for _ in range(per_kind)]
    random.Random(3).shuffle(messages)
    producer = KafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap, acks="all", max_request_size=2 * MAX_EVENT_BYTES
    )
    writer = WriterProcess(settings)
    try:
        writer.start()
        for raw in messages:
            producer.send(settings.feedback_topic, value=raw)
        producer.flush()
        log = _memory(settings, model_fingerprint(tiny_model_dir))
        wait_for(lambda: len(log) >= valid, 120, 0.2, "every valid event")
        wait_for(lambda: _committed_lag(settings, settings.feedback_topic) == 0, 30, 0.2, "lag back to 0")
        assert writer.alive() and writer.starts == 1, "the writer crashed"
    finally:
        writer.stop()
        producer.close()
    assert sorted(_ids_in(log)) == sorted(f"ok-{i}" for i in range(valid))
    dlq = KafkaConsumer(
        settings.dlq_topic,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        consumer_timeout_ms=3000,
        max_partition_fetch_bytes=4 << 20,
    )
    letters = list(dlq)
    dlq.close()
    reasons = [dict(m.headers)["driftserve.reason"].decode() for m in letters]
    assert {k: reasons.count(k) for k in kinds} == dict.fromkeys(kinds, per_kind)
    assert all(
        dict(m.headers)["driftserve.origin.topic"].decode() == settings.feedback_topic for m in letters
    )


def test_consumption_resumes_from_committed_offsets_after_a_broker_restart(
    isolated, tiny_model_dir, tmp_path
):
    port = 19792
    settings = isolated(create_topics=False, kafka_bootstrap=f"127.0.0.1:{port}")
    broker = PersistentBroker(settings, tmp_path, broker_port=port, s3_port=19793)
    broker.start_storage()
    broker.start_broker()
    writer = WriterProcess(settings)
    log = _memory(settings, model_fingerprint(tiny_model_dir))

    def send(start: int, count: int) -> None:
        producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        for i in range(start, start + count):
            producer.send(
                settings.feedback_topic,
                value=json.dumps({"event_id": f"p-{i}", "text": f"t {i}", "label": "a"}).encode(),
            )
        producer.flush()
        producer.close()

    try:
        ensure_topics(settings.kafka(), timeout_s=30)
        writer.start()
        send(0, 100)
        wait_for(lambda: len(log) >= 100, 60, 0.2, "the first 100 events")
        wait_for(lambda: _committed_lag(settings, settings.feedback_topic) == 0, 30, 0.2, "offsets committed")
        writer.stop()
        broker.stop_broker()
        broker.start_broker()
        ensure_topics(settings.kafka(), timeout_s=30)
        send(100, 100)
        writer.start()
        wait_for(lambda: len(log) >= 200, 60, 0.2, "the next 100 events")
        wait_for(lambda: _committed_lag(settings, settings.feedback_topic) == 0, 30, 0.2, "offsets committed")
    finally:
        writer.stop()
        broker.stop()
    assert sorted(_ids_in(log)) == sorted(f"p-{i}" for i in range(200))
    # Resumed from the committed offsets: nothing before them was consumed again.
    assert log.duplicates() == 0


def test_what_head_and_memory_said_travels_from_request_to_every_replicas_log(isolated, tiny_model_dir):
    """Serving's record of a mixed answer, the writer's entry for its label, and the Redis log a replica
    reads: the (version, p_head, p_memory) that calibrates the mix survives each hop; entries without
    one read back as before."""
    settings = isolated(create_topics=False)
    fingerprint = model_fingerprint(tiny_model_dir)
    rcfg = settings.redis()
    client = connect(rcfg)
    cache = RequestEmbeddings(client, rcfg, fingerprint)
    vec = np.ones(32, dtype=np.float32) / np.sqrt(32)
    served = ServedMix("v3", {"pos": 0.8, "neg": 0.2}, {"pos": 0.25, "neg": 0.75})
    cache.put_many([("req-a", vec), ("req-b", vec)], [served.to_json(), None])
    keys, mixes = cache.get_many(["req-a", "req-b", "req-none"], 32)
    assert [k is not None for k in keys] == [True, True, False] and mixes[1:] == [None, None]
    assert ServedMix.from_json(mixes[0]) == served

    class KeysOnly:  # the keys come from the request cache: no model call is needed
        dim = 32
        fingerprint = model_fingerprint(tiny_model_dir)

        def encode(self, texts):
            return np.tile(vec, (len(texts), 1))

    log = _memory(settings, fingerprint)
    producer = make_producer(settings.kafka())
    try:
        writer = MemoryWriter(KeysOnly(), settings.kafka(), log, producer, cache)
        rows = [
            {"event_id": "a", "text": "t", "label": "neg", "request_id": "req-a"},
            {"event_id": "b", "text": "t", "label": "neg", "request_id": "req-b"},
            {"event_id": "c", "text": "t", "label": "neg"},
        ]
        Record = namedtuple("Record", "topic partition offset key value")
        records = [
            Record(settings.feedback_topic, 0, i, b"d", json.dumps(r).encode()) for i, r in enumerate(rows)
        ]
        assert writer.handle(records)["applied"] == 3
    finally:
        producer.close()
    read = {op.event_id: op.mix for _, op in log.read_since("0", count=10)}
    assert read == {"a": ("v3", 0.2, 0.75, 0.0, 0.0, 0.0), "b": None, "c": None}
