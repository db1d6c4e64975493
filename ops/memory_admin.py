"""``driftserve memory rebuild``: reconstruct the error memory from the Kafka log while serving goes on.

The Kafka topics are the source of truth; Redis holds a view. A rebuild writes a *new generation* of the
memory stream, flips the generation pointer (replicas load the new generation completely, then swap it
in), and finally replays what arrived while it ran. Forget events are read first, so forgotten data is
never rebuilt. With another base model configured, the rebuild re-keys the memory for that model.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition

from ops.settings import Settings
from ops.wiring import key_encoder as make_encoder
from serving.encoder import Encoder
from serving.feedback_writer import GROUP_ROLE as WRITER_ROLE
from streams.errors import InvalidEvent
from streams.kafka_io import KafkaConfig
from streams.redis_store import MemoryEntry, MemoryLog, connect
from streams.schemas import parse_feedback, parse_forget

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RebuildReport:
    generation: int
    forgets: int
    events: int
    added: int
    skipped_invalid: int
    caught_up: int
    seconds: float


def _consumer(cfg: KafkaConfig, group_id: str | None = None) -> KafkaConsumer:
    return KafkaConsumer(**cfg.client_kwargs(), group_id=group_id, enable_auto_commit=False)


def _partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    parts = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(parts)]


def _read_range(
    consumer: KafkaConsumer,
    parts: list[TopicPartition],
    start: dict[TopicPartition, int],
    end: dict[TopicPartition, int] | None,
    reached: dict[TopicPartition, int],
):
    """Yield records with start <= offset < end per partition; ``end=None`` means the high watermark
    seen at the first fetch (a snapshot of the log end). ``reached`` receives the end used.

    The high watermark comes from fetch responses, not ListOffsets: Tansu answers ListOffsets(latest)
    with the last batch's base offset + 1, which undercounts batched partitions.
    """
    listed = consumer.end_offsets(parts)
    todo = set()
    for tp in parts:
        begin = start.get(tp, 0)
        if listed[tp] == 0 or (end is not None and end[tp] <= begin):
            reached[tp] = begin if end is None else end[tp]
            continue
        todo.add(tp)
    if not todo:
        return
    consumer.assign(sorted(todo, key=lambda t: (t.topic, t.partition)))
    for tp in todo:
        consumer.seek(tp, start.get(tp, 0))
    limits = dict(end) if end is not None else {}
    idle_deadline = time.monotonic() + 30
    while todo:
        polled = consumer.poll(timeout_ms=500)
        for tp in list(todo):
            if tp not in limits and consumer.highwater(tp) is not None:
                limits[tp] = consumer.highwater(tp)
        for tp, records in polled.items():
            for rec in records:
                if tp not in limits or rec.offset < limits[tp]:
                    yield rec
        for tp in list(todo):
            if tp in limits and consumer.position(tp) >= limits[tp]:
                reached[tp] = limits[tp]
                todo.discard(tp)
                consumer.pause(tp)
        if polled:
            idle_deadline = time.monotonic() + 30
        elif time.monotonic() > idle_deadline:
            raise TimeoutError(f"no records and no log end for {sorted(map(str, todo))} within 30s")


class Rebuilder:
    def __init__(self, settings: Settings, encoder: Encoder | None = None, batch_size: int = 256) -> None:
        self.settings = settings
        self.kafka = settings.kafka()
        self.encoder = encoder or make_encoder(settings)
        self.redis_cfg = settings.redis()
        self.batch_size = batch_size
        self.from_time: float | None = None

    def _apply_feedback(self, target: MemoryLog, records) -> tuple[int, int, int]:
        events, invalid, added = [], 0, 0
        not_before_ms = None if self.from_time is None else int(self.from_time * 1000)
        version = self.encoder.fingerprint[:12]

        def flush() -> int:
            if not events:
                return 0
            keys = self.encoder.encode([e.text for e in events])
            entries = [
                MemoryEntry(e.event_id, e.domain, e.label, keys[i], e.ts, version, e.subject_id)
                for i, e in enumerate(events)
            ]
            n = target.add_once(entries)
            events.clear()
            return n

        seen = 0
        for rec in records:
            if not_before_ms is not None and rec.timestamp < not_before_ms:
                continue
            seen += 1
            try:
                events.append(parse_feedback(rec.value).event)
            except InvalidEvent:
                invalid += 1  # already dead-lettered by the live writer
            if len(events) >= self.batch_size:
                added += flush()
        added += flush()
        return seen, added, invalid

    def run(self, from_offset: int | None = None, from_time: float | None = None) -> RebuildReport:
        started = time.monotonic()
        self.from_time = from_time
        current = MemoryLog(connect(self.redis_cfg), self.redis_cfg, self.encoder.fingerprint)
        target = current.at(current.generation + 1)
        target.drop()
        consumer = _consumer(self.kafka)
        try:
            # 1. Forgets first: the forgotten sets are global, so the new generation refuses that data.
            forget_parts = _partitions(consumer, self.kafka.forget_topic)
            forgets = 0
            if forget_parts:
                for rec in _read_range(consumer, forget_parts, {}, None, {}):
                    try:
                        f = parse_forget(rec.value).event
                    except InvalidEvent:
                        continue
                    target.forget(list(f.event_ids), f.subject_id)
                    forgets += 1
            # 2. Feedback from the chosen start up to a snapshot of the log end.
            parts = _partitions(consumer, self.kafka.feedback_topic)
            if from_time is not None:
                found = consumer.offsets_for_times({tp: int(from_time * 1000) for tp in parts})
                # Where nothing is at or after T, read the partition and let the timestamp filter drop it.
                start = {tp: found[tp].offset if found.get(tp) else 0 for tp in parts}
            else:
                start = {tp: from_offset or 0 for tp in parts}
            end1: dict[TopicPartition, int] = {}
            seen, added, invalid = self._apply_feedback(
                target, _read_range(consumer, parts, start, None, end1)
            )
            # 3. Switch readers and the live writer to the new generation ...
            target.activate()
            # 4. ... then replay what arrived meanwhile. Batches the live writer applied to the old
            # generation all end before end2 (taken after the switch): wait until it committed past end2,
            # then replay [end1, end2) again; idempotency makes the overlap harmless.
            end2: dict[TopicPartition, int] = {}
            caught, added2, invalid2 = self._apply_feedback(
                target, _read_range(consumer, parts, end1, None, end2)
            )
            self._wait_for_writer(parts, end2)
            added2 += self._apply_feedback(target, _read_range(consumer, parts, end1, end2, {}))[1]
        finally:
            consumer.close()
        report = RebuildReport(
            generation=target.generation,
            forgets=forgets,
            events=seen + caught,
            added=added + added2,
            skipped_invalid=invalid + invalid2,
            caught_up=caught,
            seconds=time.monotonic() - started,
        )
        log.info("memory rebuilt: %s", report)
        return report

    def _wait_for_writer(
        self, parts: list[TopicPartition], end: dict[TopicPartition, int], timeout_s: float = 60
    ):
        probe = _consumer(self.kafka, group_id=self.kafka.group(WRITER_ROLE))
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                committed = {tp: probe.committed(tp) or 0 for tp in parts}
                if all(committed[tp] >= end[tp] for tp in parts):
                    return
                time.sleep(0.2)
            log.warning("memory writer did not catch up within %.0fs; replaying the gap anyway", timeout_s)
        finally:
            probe.close()
