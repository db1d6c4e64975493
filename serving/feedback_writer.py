"""The memory writer: Kafka feedback and forget events -> the error memory in Redis.

Per polled batch: parse in our code (bad messages are dead-lettered with the reason and origin), take
each feedback's memory key from the request-embedding cache when it names a request id and encode the
rest in one batch, append to the Redis log under the idempotency key, apply forgets, and only then commit
the offsets. If Redis or the DLQ write fails nothing is committed: the consumer rewinds to the batch start
and retries, and idempotency makes the replay harmless.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from serving import metrics
from serving.encoder import TextEncoder
from serving.mixing import Outcome, ServedMix
from streams.errors import InvalidEvent, StoreUnavailable
from streams.kafka_io import FAST_FETCH_WAIT_MS, KafkaConfig, dead_letter, make_consumer, make_producer
from streams.redis_store import MemoryEntry, MemoryLog, RedisConfig, RequestEmbeddings, connect
from streams.schemas import FeedbackEvent, ForgetEvent, parse_feedback, parse_forget

log = logging.getLogger(__name__)

GROUP_ROLE = "memory-writer"


class MemoryWriter:
    def __init__(
        self,
        encoder: TextEncoder,
        kafka: KafkaConfig,
        log: MemoryLog,
        producer: KafkaProducer,
        request_embeddings: RequestEmbeddings | None = None,
    ) -> None:
        self.encoder = encoder
        self.kafka = kafka
        self.log = log
        self.request_embeddings = request_embeddings
        self._producer = producer

    @classmethod
    def connect(cls, encoder: TextEncoder, kafka: KafkaConfig, redis_cfg: RedisConfig) -> MemoryWriter:
        client = connect(redis_cfg)
        return cls(
            encoder,
            kafka,
            MemoryLog(client, redis_cfg, encoder.fingerprint),
            make_producer(kafka),
            RequestEmbeddings(client, redis_cfg, encoder.fingerprint),
        )

    def _dead_letter(self, rec: ConsumerRecord, exc: InvalidEvent) -> None:
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
        log.warning("dead-lettered %s[%d]@%d: %s", rec.topic, rec.partition, rec.offset, exc)

    def keys_for(self, events: list[FeedbackEvent]) -> tuple[np.ndarray, list[Outcome | None]]:
        """Memory keys: cached request embeddings where the feedback names a request, else encoded; and
        what each named request was answered with (``serving.mixing``), where serving kept it. One Redis
        round trip for both; a missing record (expired, nothing to learn, Redis down) only costs the
        encoding or a calibration step."""
        keys = np.zeros((len(events), self.encoder.dim), dtype=np.float32)
        outcomes: list[Outcome | None] = [None] * len(events)
        missing = list(range(len(events)))
        named = [i for i, e in enumerate(events) if e.request_id]
        if self.request_embeddings is not None and named:
            try:
                cached, served = self.request_embeddings.get_many(
                    [events[i].request_id for i in named], self.encoder.dim
                )
            except StoreUnavailable:
                cached, served = [None] * len(named), [None] * len(named)
            hits = {i for i, vec in zip(named, cached, strict=True) if vec is not None}
            for i, vec, raw in zip(named, cached, served, strict=True):
                if vec is not None:
                    keys[i] = vec
                mix = ServedMix.from_json(raw) if raw is not None else None
                if mix is not None:
                    outcomes[i] = mix.outcome(events[i].label)
            missing = [i for i in missing if i not in hits]
            if hits:
                metrics.FEEDBACK_KEYS.labels("request_cache").inc(len(hits))
        if missing:
            keys[missing] = self.encoder.encode([events[i].text for i in missing])
            metrics.FEEDBACK_KEYS.labels("encoded").inc(len(missing))
        return keys, outcomes

    def handle(self, records: list[ConsumerRecord]) -> dict[str, int]:
        """Apply one batch in order; raises (after only idempotent effects) if it must be retried."""
        counts = {"applied": 0, "duplicate": 0, "dead_lettered": 0, "forgotten": 0}
        if hasattr(self.log, "follow"):
            self.log = self.log.follow()  # a rebuild may have switched the generation
        feedback: list[FeedbackEvent] = []
        forgets: list[ForgetEvent] = []
        for rec in records:
            try:
                parsed = (
                    parse_forget(rec.value)
                    if rec.topic == self.kafka.forget_topic
                    else parse_feedback(rec.value)
                )
            except InvalidEvent as exc:
                self._dead_letter(rec, exc)
                counts["dead_lettered"] += 1
                continue
            if parsed.unknown_fields:
                metrics.FEEDBACK_UNKNOWN_FIELDS.inc(len(parsed.unknown_fields))
            (forgets if isinstance(parsed.event, ForgetEvent) else feedback).append(parsed.event)
        if feedback:
            keys, mixes = self.keys_for(feedback)
            version = self.encoder.fingerprint[:12]
            entries = [
                MemoryEntry(e.event_id, e.domain, e.label, keys[i], e.ts, version, e.subject_id, mixes[i])
                for i, e in enumerate(feedback)
            ]
            new = self.log.add_once(entries)
            counts["applied"] += new
            counts["duplicate"] += len(entries) - new
        # Forgets after adds: a forget in the same batch as its event still removes it.
        for f in forgets:
            counts["forgotten"] += self.log.forget(list(f.event_ids), f.subject_id)
        for outcome, n in counts.items():
            if n:
                metrics.FEEDBACK_CONSUMED.labels("memory_writer", outcome).inc(n)
        return counts

    def run(self, stop: threading.Event, on_ready=None, on_batch=None) -> None:
        topics = [self.kafka.feedback_topic, self.kafka.forget_topic]
        # The feedback-to-fix path: a short fetch wait, so a lone feedback event is not held by the broker.
        consumer = make_consumer(
            self.kafka, self.kafka.group(GROUP_ROLE), topics, fetch_max_wait_ms=FAST_FETCH_WAIT_MS
        )
        lag = LagReporter(consumer, "memory_writer")
        try:
            while not stop.is_set():
                polled = consumer.poll(timeout_ms=200)
                if on_ready is not None and consumer.assignment():
                    on_ready()
                    on_ready = None
                records = [r for batch in polled.values() for r in batch]
                if records:
                    try:
                        counts = self.handle(records)
                    except Exception as exc:  # retry the whole batch: nothing was committed
                        log.warning("batch of %d failed, will retry: %s", len(records), exc)
                        metrics.CONSUMER_RETRIES.labels("memory_writer").inc()
                        rewind(consumer, records)
                        stop.wait(1.0)
                        continue
                    consumer.commit()
                    if on_batch is not None:
                        on_batch(counts)
                lag.maybe_report()
        finally:
            consumer.close(autocommit=False)
            self._producer.close(timeout=5)


def rewind(consumer: KafkaConsumer, records: list[ConsumerRecord]) -> None:
    first: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        first[tp] = min(first.get(tp, r.offset), r.offset)
    for tp, offset in first.items():
        consumer.seek(tp, offset)


class LagReporter:
    """Consumer lag (end offset - position, summed over assigned partitions), at most every ``period_s``."""

    def __init__(self, consumer: KafkaConsumer, name: str, period_s: float = 2.0) -> None:
        self.consumer = consumer
        self.name = name
        self.period_s = period_s
        self._next = 0.0

    def maybe_report(self) -> int | None:
        now = time.monotonic()
        if now < self._next:
            return None
        self._next = now + self.period_s
        partitions = list(self.consumer.assignment())
        if not partitions:
            return None
        try:
            # The high watermark from fetch responses; ListOffsets is the fallback before any fetch
            # (Tansu answers ListOffsets with the last batch's base offset + 1, an undercount).
            missing = [tp for tp in partitions if self.consumer.highwater(tp) is None]
            ends = self.consumer.end_offsets(missing) if missing else {}
            lag = 0
            for tp in partitions:
                end = self.consumer.highwater(tp)
                lag += max(0, (end if end is not None else ends[tp]) - self.consumer.position(tp))
        except Exception as exc:  # lag is telemetry; never let it stop consumption
            log.debug("lag probe failed: %s", exc)
            return None
        metrics.CONSUMER_LAG.labels(self.name).set(lag)
        return lag
