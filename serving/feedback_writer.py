"""The memory writer: Kafka feedback -> error-memory entries in Redis.

Per polled batch: parse in our code (bad messages are dead-lettered with the reason), encode the texts
in one batch, append to the Redis log with the idempotency key, and only then commit the offsets. If
Redis or the DLQ write fails, nothing is committed; the consumer rewinds to the batch start and retries,
and idempotency makes the replay harmless.
"""

from __future__ import annotations

import logging
import threading

from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from serving import metrics
from serving.encoder import Encoder
from streams.errors import InvalidEvent, StoreUnavailable
from streams.kafka_io import KafkaConfig, dead_letter, make_consumer, make_producer
from streams.redis_store import MemoryEntry, MemoryLog, RedisConfig, connect
from streams.schemas import FeedbackEvent, parse_feedback

log = logging.getLogger(__name__)

GROUP_ID = "driftserve-memory-writer"


class MemoryWriter:
    def __init__(self, encoder: Encoder, kafka: KafkaConfig, log: MemoryLog, producer: KafkaProducer) -> None:
        self.encoder = encoder
        self.kafka = kafka
        self.log = log
        self._producer = producer

    @classmethod
    def connect(cls, encoder: Encoder, kafka: KafkaConfig, redis_cfg: RedisConfig) -> MemoryWriter:
        log = MemoryLog(connect(redis_cfg), redis_cfg, encoder.fingerprint)
        return cls(encoder, kafka, log, make_producer(kafka))

    def handle(self, records: list[ConsumerRecord]) -> dict[str, int]:
        """Apply one batch; raises (without side effects beyond idempotent ones) if it must be retried."""
        counts = {"applied": 0, "duplicate": 0, "dead_lettered": 0}
        events: list[FeedbackEvent] = []
        for rec in records:
            try:
                parsed = parse_feedback(rec.value)
            except InvalidEvent as exc:
                dead_letter(
                    self._producer,
                    self.kafka,
                    value=rec.value,
                    key=rec.key,
                    reason=exc.reason,
                    detail=exc.detail,
                    topic=rec.topic,
                    partition=rec.partition,
                    offset=rec.offset,
                )
                counts["dead_lettered"] += 1
                log.warning("dead-lettered %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc)
                continue
            if parsed.unknown_fields:
                metrics.FEEDBACK_UNKNOWN_FIELDS.inc(len(parsed.unknown_fields))
            events.append(parsed.event)
        if events:
            keys = self.encoder.encode([e.text for e in events])
            entries = [
                MemoryEntry(e.event_id, e.domain, e.label, keys[i], e.ts, self.encoder.fingerprint[:12])
                for i, e in enumerate(events)
            ]
            new = self.log.add_once(entries)
            counts["applied"] += new
            counts["duplicate"] += len(entries) - new
        for outcome, n in counts.items():
            if n:
                metrics.FEEDBACK_CONSUMED.labels("memory_writer", outcome).inc(n)
        return counts

    def run(self, stop: threading.Event, on_ready=None, on_batch=None) -> None:
        consumer = make_consumer(self.kafka, GROUP_ID, [self.kafka.feedback_topic])
        try:
            while not stop.is_set():
                polled = consumer.poll(timeout_ms=200)
                if on_ready is not None and consumer.assignment():
                    on_ready()
                    on_ready = None
                records = [r for batch in polled.values() for r in batch]
                if not records:
                    continue
                try:
                    counts = self.handle(records)
                except (StoreUnavailable, Exception) as exc:  # retry the whole batch: nothing was committed
                    log.warning("batch of %d failed, will retry: %s", len(records), exc)
                    _rewind(consumer, records)
                    stop.wait(1.0)
                    continue
                consumer.commit()
                if on_batch is not None:
                    on_batch(counts)
        finally:
            consumer.close(autocommit=False)
            self._producer.close(timeout=5)


def _rewind(consumer: KafkaConsumer, records: list[ConsumerRecord]) -> None:
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    for tp, offset in first.items():
        consumer.seek(tp, offset)
