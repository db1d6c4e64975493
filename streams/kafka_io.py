"""Kafka clients configured the one way driftserve uses them.

Consumers never deserialize (a failing deserializer stalls ``poll()``), never auto-commit (offsets are
committed after the effect is durable), and bad messages go to the dead-letter topic with the reason and
their origin in headers.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from streams.errors import StoreUnavailable

log = logging.getLogger(__name__)

FEEDBACK_TOPIC = "driftserve.feedback"
DLQ_TOPIC = "driftserve.dlq"
ROLLOUT_TOPIC = "driftserve.rollout"
FORGET_TOPIC = "driftserve.forget"


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:19092"
    feedback_topic: str = FEEDBACK_TOPIC
    dlq_topic: str = DLQ_TOPIC
    rollout_topic: str = ROLLOUT_TOPIC
    forget_topic: str = FORGET_TOPIC
    partitions: int = 3
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 2000
    client_id: str = "driftserve"
    group_prefix: str = "driftserve"  # consumer groups are <prefix>-memory-writer, <prefix>-learner

    def group(self, role: str) -> str:
        return f"{self.group_prefix}-{role}"

    # Security: PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL; SCRAM-SHA-256/512 or PLAIN for SASL.
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def client_kwargs(self) -> dict[str, Any]:
        """Connection and security options shared by producers, consumers and the admin client."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol.startswith("SASL"):
            kwargs.update(
                sasl_mechanism=self.sasl_mechanism or "SCRAM-SHA-512",
                sasl_plain_username=self.sasl_username,
                sasl_plain_password=self.sasl_password,
            )
        for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name):
                kwargs[name] = getattr(self, name)
        return kwargs


def make_producer(cfg: KafkaConfig) -> KafkaProducer:
    """A producer that waits for the broker's acknowledgement of every write."""
    return KafkaProducer(
        **cfg.client_kwargs(),
        client_id=cfg.client_id,
        acks="all",
        retries=5,
        linger_ms=2,
        max_block_ms=10_000,
        request_timeout_ms=10_000,
    )


# How long the broker may hold an empty fetch. Tansu, the embedded broker, does not always answer a held
# fetch when a record arrives (measured with one record every 0.3-1.2 s on a 4-partition topic: p50 11 ms
# and p90 28 ms delivery at 50 ms, p50 81 ms and p90 230 ms at 500 ms). So the consumer on the
# feedback-to-fix path (the memory writer) waits briefly; the others, which nobody waits on, long-poll
# and save the idle fetch round-trips (~3% of a core per consumer at 50 ms).
FAST_FETCH_WAIT_MS = 50
IDLE_FETCH_WAIT_MS = 500


def make_consumer(
    cfg: KafkaConfig, group_id: str, topics: Iterable[str], fetch_max_wait_ms: int = IDLE_FETCH_WAIT_MS
) -> KafkaConsumer:
    return KafkaConsumer(
        *topics,
        **cfg.client_kwargs(),
        client_id=f"{cfg.client_id}-{group_id}",
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=cfg.session_timeout_ms,
        heartbeat_interval_ms=cfg.heartbeat_interval_ms,
        max_poll_records=256,
        fetch_max_wait_ms=fetch_max_wait_ms,
        max_poll_interval_ms=600_000,
    )


def ensure_topics(cfg: KafkaConfig, timeout_s: float = 20.0) -> None:
    """Create driftserve's topics if absent; retries while the broker is still starting."""
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            admin = KafkaAdminClient(**cfg.client_kwargs(), client_id=cfg.client_id)
        except KafkaError as exc:
            last = exc
            time.sleep(0.3)
            continue
        try:
            existing = set(admin.list_topics())
            wanted = [
                NewTopic(name, cfg.partitions if name == cfg.feedback_topic else 1, 1)
                for name in (cfg.feedback_topic, cfg.dlq_topic, cfg.rollout_topic, cfg.forget_topic)
                if name not in existing
            ]
            if wanted:
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics(wanted)
            return
        except KafkaError as exc:
            last = exc
            time.sleep(0.3)
        finally:
            admin.close()
    raise StoreUnavailable(f"Kafka at {cfg.bootstrap_servers} not reachable: {last}")


def dead_letter(
    producer: KafkaProducer,
    cfg: KafkaConfig,
    *,
    value: bytes | None,
    key: bytes | None,
    reason: str,
    detail: str,
    topic: str,
    partition: int,
    offset: int,
) -> None:
    """Write the original bytes to the DLQ with why and where it came from; blocks until acknowledged."""
    headers = [
        ("driftserve.reason", reason.encode()),
        ("driftserve.detail", detail[:1000].encode("utf-8", "replace")),
        ("driftserve.origin.topic", topic.encode()),
        ("driftserve.origin.partition", str(partition).encode()),
        ("driftserve.origin.offset", str(offset).encode()),
    ]
    producer.send(cfg.dlq_topic, value=value or b"", key=key, headers=headers).get(timeout=10)
