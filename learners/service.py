"""The learner service: feedback stream -> replay buffers -> candidate adapter -> evaluation with
serving's own Predictor -> gate -> atomic publish -> registry pointer -> rollout event.

Offsets are committed after the buffer append is fsynced. Training runs in the poll loop (the consumer's
``max_poll_interval_ms`` covers a run); later learners move it to a worker.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from learners import artifacts
from learners.buffer import Example, ReplayBuffers
from learners.trainer import TrainConfig, train_adapter
from serving import metrics
from serving.artifacts import Artifact, load_artifact
from serving.compensator import CompensationConfig
from serving.encoder import Encoder
from serving.memory import InProcessMemory
from serving.predictor import Predictor
from streams.errors import InvalidEvent
from streams.kafka_io import KafkaConfig, make_consumer, make_producer
from streams.redis_store import MemoryLog, RedisConfig, RegistryPointers, connect
from streams.schemas import ArtifactManifest, parse_feedback, parse_forget

log = logging.getLogger(__name__)

GROUP_ROLE = "learner"


@dataclass(frozen=True)
class LearnerPolicy:
    min_examples: int = 32
    retrain_every: int = 64
    holdout_frac: float = 0.2
    gate_epsilon: float = 0.02


@dataclass(frozen=True)
class RunReport:
    domain: str
    version: str
    promoted: bool
    reason: str
    metrics: dict[str, float]


class Learner:
    def __init__(
        self,
        encoder: Encoder,
        *,
        kafka: KafkaConfig,
        redis_cfg: RedisConfig,
        artifacts_dir: Path,
        buffer_dir: Path,
        train_cfg: TrainConfig,
        policy: LearnerPolicy,
        comp: CompensationConfig,
    ) -> None:
        self.encoder = encoder
        self.kafka = kafka
        self.artifacts_dir = Path(artifacts_dir)
        self.train_cfg = train_cfg
        self.policy = policy
        self.comp = comp
        client = connect(redis_cfg)
        self.pointers = RegistryPointers(client, redis_cfg)
        self.memory_log = MemoryLog(client, redis_cfg, encoder.fingerprint)
        self.buffers = ReplayBuffers(buffer_dir)
        self.reports: list[RunReport] = []
        self.unlearn: set[str] = set()  # domains whose adapter saw forgotten data: retrain from scratch

    # -- triggers ---------------------------------------------------------------------------------------
    def _enough(self, examples: list[Example]) -> bool:
        return len(examples) >= self.policy.min_examples and len({e.label for e in examples}) >= 2

    def due(self, domain: str) -> bool:
        examples = self.buffers.examples(domain)
        has_adapter = domain in self.pointers.active()
        if domain in self.unlearn:
            if has_adapter and not self._enough(examples):
                # Too little data left to train without the forgotten examples: stop serving the adapter.
                self.pointers.clear(domain)
                log.info("domain %s: adapter withdrawn after forget (too little data left)", domain)
            if not has_adapter or not self._enough(examples):
                self.unlearn.discard(domain)
                return False
            return True
        if not self._enough(examples):
            return False
        return not has_adapter or self.buffers.new_since_train(domain) >= self.policy.retrain_every

    # -- one training run -------------------------------------------------------------------------------
    def current(self, domain: str) -> Artifact | None:
        version = self.pointers.active().get(domain)
        if version is None:
            return None
        return load_artifact(
            self.artifacts_dir / domain / version,
            base_fingerprint=self.encoder.fingerprint,
            dim=self.encoder.dim,
        )

    def train_domain(self, domain: str) -> RunReport:
        started = time.monotonic()
        examples = sorted(self.buffers.examples(domain), key=lambda e: e.ts)
        n_hold = int(len(examples) * self.policy.holdout_frac)
        train, hold = (examples[:-n_hold], examples[-n_hold:]) if n_hold else (examples, [])
        parent = self.current(domain)
        # Exact unlearning at adapter scope: an adapter that saw forgotten data is not a starting point.
        unlearning = domain in self.unlearn
        trained = train_adapter(
            self.encoder,
            [e.text for e in train],
            [e.label for e in train],
            self.train_cfg,
            parent=None if unlearning else parent,
        )
        version = artifacts.new_version()
        manifest = ArtifactManifest(
            domain=domain,
            version=version,
            parent=parent.manifest.version if parent else None,
            base_fingerprint=self.encoder.fingerprint,
            labels=trained.labels,
            files={},
            lora={
                "r": self.train_cfg.r,
                "alpha": self.train_cfg.alpha,
                "target_modules": list(self.train_cfg.target_modules),
            },
            data_window={
                "n_train": len(train),
                "n_holdout": len(hold),
                "from_ts": examples[0].ts,
                "to_ts": examples[-1].ts,
            },
        )
        staged = artifacts.stage(self.artifacts_dir, manifest, trained.write)
        try:
            candidate = load_artifact(staged, base_fingerprint=self.encoder.fingerprint, dim=self.encoder.dim)
            scores = self.evaluate(domain, candidate, parent, train, hold)
            scores["train_steps"] = float(trained.steps)
            scores["train_loss"] = trained.final_loss
            promoted, reason = self.gate(scores, has_holdout=bool(hold))
            if unlearning and not promoted:
                promoted, reason = (
                    True,
                    f"unlearning: replaces an adapter trained on forgotten data ({reason})",
                )
            scores["train_seconds"] = time.monotonic() - started
            if not promoted:
                artifacts.discard(staged)
            else:
                artifacts.commit(staged, metrics=scores)
                self.pointers.set_active(domain, version)
        except BaseException:
            artifacts.discard(staged)
            raise
        self.buffers.mark_trained(domain)
        self.unlearn.discard(domain)
        metrics.LEARNER_RUNS.labels("promoted" if promoted else "rejected").inc()
        metrics.LEARNER_SECONDS.observe(time.monotonic() - started)
        report = RunReport(domain, version, promoted, reason, scores)
        self.reports.append(report)
        log.info(
            "domain %s candidate %s: %s (%s) %s",
            domain,
            version,
            "promoted" if promoted else "rejected",
            reason,
            scores,
        )
        return report

    def evaluate(
        self,
        domain: str,
        candidate: Artifact,
        parent: Artifact | None,
        train: list[Example],
        hold: list[Example],
    ) -> dict[str, float]:
        """Accuracy of candidate and current on held-out recent feedback, through serving's Predictor with
        the error memory holding only the training window (so held-out answers are not looked up)."""
        if not hold:
            return {}
        memory = InProcessMemory(self.encoder.dim)
        train_ids = {e.event_id for e in train}
        memory.add([e for e in self.memory_log.iter_all() if e.domain == domain and e.event_id in train_ids])
        predictor = Predictor(self.encoder, memory, self.comp)
        texts, truth = [e.text for e in hold], [e.label for e in hold]

        def acc() -> float:
            preds = predictor.predict(texts, [domain] * len(texts))
            return sum(p.label == t for p, t in zip(preds, truth, strict=True)) / len(truth)

        if parent is not None:
            predictor.activate(parent)
        current = acc()
        predictor.activate(candidate)
        new = acc()
        predictor.deactivate(domain)
        return {"holdout_accuracy": new, "current_accuracy": current, "holdout_size": float(len(hold))}

    def gate(self, scores: dict[str, float], *, has_holdout: bool) -> tuple[bool, str]:
        if not has_holdout:
            return True, "no holdout yet: first adapter accepted on training data"
        new, cur = scores["holdout_accuracy"], scores["current_accuracy"]
        if new >= cur - self.policy.gate_epsilon:
            return True, f"accuracy {new:.3f} >= current {cur:.3f} - {self.policy.gate_epsilon}"
        return False, f"accuracy {new:.3f} < current {cur:.3f} - {self.policy.gate_epsilon}"

    # -- the loop ---------------------------------------------------------------------------------------
    def apply(self, records: list) -> None:
        """Buffer feedback and apply forgets (durably) for one polled batch."""
        events = []
        for rec in records:
            try:
                if rec.topic == self.kafka.forget_topic:
                    forget = parse_forget(rec.value).event
                    self.buffers.add(events)  # order: what came before the forget is covered by it
                    events = []
                    for domain in self.buffers.forget(list(forget.event_ids), forget.subject_id):
                        self.unlearn.add(domain)
                    metrics.FEEDBACK_CONSUMED.labels("learner", "forget").inc()
                else:
                    events.append(parse_feedback(rec.value).event)
            except InvalidEvent:
                metrics.FEEDBACK_CONSUMED.labels("learner", "invalid").inc()
        self.buffers.add(events)
        metrics.FEEDBACK_CONSUMED.labels("learner", "applied").inc(len(events))

    def run(self, stop: threading.Event, on_ready=None) -> None:
        consumer = make_consumer(
            self.kafka, self.kafka.group(GROUP_ROLE), [self.kafka.feedback_topic, self.kafka.forget_topic]
        )
        producer = make_producer(self.kafka)
        try:
            while not stop.is_set():
                polled = consumer.poll(timeout_ms=500)
                if on_ready is not None and consumer.assignment():
                    on_ready()
                    on_ready = None
                records = [r for batch in polled.values() for r in batch]
                if records:
                    self.apply(records)  # durable before the commit
                    consumer.commit()
                for domain in self.buffers.domains():
                    if stop.is_set() or not self.due(domain):
                        continue
                    try:
                        report = self.train_domain(domain)
                    except Exception:
                        metrics.LEARNER_RUNS.labels("failed").inc()
                        log.exception("training %s failed", domain)
                        self.buffers.mark_trained(domain)  # wait for more data before trying again
                        continue
                    event = {
                        "type": "promoted" if report.promoted else "rejected",
                        "domain": domain,
                        "version": report.version,
                        "reason": report.reason,
                        "metrics": report.metrics,
                        "ts": time.time(),
                    }
                    producer.send(
                        self.kafka.rollout_topic, key=domain.encode(), value=json.dumps(event).encode()
                    ).get(timeout=10)
        finally:
            consumer.close(autocommit=False)
            producer.close(timeout=5)
