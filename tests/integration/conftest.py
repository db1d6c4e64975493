"""One real embedded stack for the integration tests: Tansu broker, Redis, Ray Serve (2 replicas), the
memory writer and a learner, on 127.0.0.1 ports that do not clash with a developer's ``driftserve up``."""

from __future__ import annotations

import itertools
import json

import httpx
import pytest
from kafka import KafkaConsumer, KafkaProducer

from ops.settings import load_settings
from ops.stack import EmbeddedStack
from ops.wiring import configure_logging

_ids = itertools.count()

ADMIN_TOKEN = "integration-admin-token"
# Domains of the gate test run under a strict per-domain policy; everything else under a lenient one,
# so the learner's tiny test adapters are promoted and the promotion paths themselves are under test.
GATE_DOMAINS = (
    "gate-good",
    "gate-good-next",
    "gate-nan",
    "gate-flip",
    "gate-shape",
    "gate-pickle",
    "gate-hash",
    "gate-nfr",
)
STRICT_GATE = {
    "epsilon": 0.05,
    "max_nfr": 0.05,
    "max_ece_increase": 0.1,
    "compat_epsilon": 0.02,
    "min_holdout": 8,
    "adapter_margin": 0.1,
}
CANARY_INTERVAL_S = 1.0
CANARY_FAILURE_THRESHOLD = 2


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    settings = load_settings(
        state_dir=tmp_path_factory.mktemp("driftserve-state"),
        http_port=18080,
        kafka_bootstrap="127.0.0.1:19292",
        redis_url="redis://127.0.0.1:16579/0",
        num_replicas=2,
        replica_num_cpus=0.25,
        sync_interval_s=0.1,
        learner_min_examples=8,
        learner_retrain_every=8,
        learner_epochs=2,
        learner_max_steps=16,
        learner_holdout_frac=0.25,
        gate_epsilon=1.0,
        gate_max_nfr=1.0,
        gate_max_ece_increase=1.0,
        gate_compat_epsilon=1.0,
        gate_min_holdout=1,
        gate_adapter_margin=1.0,
        gate_first_min_gain=0.0,
        gate_policy_overrides=json.dumps({d: STRICT_GATE for d in GATE_DOMAINS}),
        shadow_seconds=1.0,
        canary_weight=0.5,
        canary_interval_s=CANARY_INTERVAL_S,
        canary_passes=3,
        canary_failure_threshold=CANARY_FAILURE_THRESHOLD,
        canary_min_requests=2,
        canary_min_feedback=4,
        canary_max_nfr=0.2,
        canary_max_p99_ms=5000.0,  # two CPU cores shared by everything: latency is not under test here
        admin_token=ADMIN_TOKEN,
    )
    configure_logging(settings)
    with EmbeddedStack(settings) as running:
        yield running


@pytest.fixture()
def registry(stack):
    from streams.redis_store import connect
    from streams.registry_store import RegistryStore

    cfg = stack.settings.redis()
    client = connect(cfg)
    yield RegistryStore(client, cfg)
    client.close()


@pytest.fixture()
def client(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        yield c


@pytest.fixture()
def producer(stack):
    p = KafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, acks="all")
    yield p
    p.close()


@pytest.fixture()
def unique():
    """A fresh name per call, so tests never see each other's domains or events."""

    def make(prefix: str) -> str:
        return f"{prefix}-{next(_ids)}"

    return make


def send_feedback(producer: KafkaProducer, topic: str, rows: list[dict]) -> None:
    """Produce feedback as any other Kafka client would: plain JSON values."""
    for row in rows:
        producer.send(topic, key=row.get("domain", "default").encode(), value=json.dumps(row).encode())
    producer.flush()


def dlq_messages(stack: EmbeddedStack, timeout_s: float = 10.0) -> list:
    consumer = KafkaConsumer(
        stack.settings.dlq_topic,
        bootstrap_servers=stack.settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=int(timeout_s * 1000),
    )
    try:
        return list(consumer)
    finally:
        consumer.close()


class BackgroundLoad:
    """Predict requests in a loop on another thread while a test changes the system under them.

    Counts answers and records failures; ``on_answer`` sees each successful JSON answer."""

    def __init__(self, url: str, body: dict, on_answer=None) -> None:
        import threading

        self.url, self.body, self.on_answer = url, body, on_answer
        self.answered = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self._stop.is_set():
                r = c.post("/v1/predict", json=self.body)
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text}")
                    continue
                self.answered += 1
                if self.on_answer is not None:
                    self.on_answer(r.json())

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def assert_shadow_then_canary(events: list) -> None:
    """One version's audit trail: candidate, shadow, analyses, and a canary started only on a shadow that
    passed (an inconclusive shadow is extended, not ended)."""
    trail = [e.type for e in events]
    assert trail[:3] == ["candidate", "shadow", "analysis"] and "canary" in trail, trail
    before = events[trail.index("canary") - 1]
    assert before.type == "analysis" and before.reason.startswith("shadow pass"), before.reason
