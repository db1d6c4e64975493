"""The learner service: feedback stream -> replay buffers -> candidate adapter -> evaluation with
serving's own Predictor -> atomic publish -> registered as a candidate. The rollout controller (ops)
gates it and rolls it out; learners never change what is served.

Offsets are committed after the buffer append is fsynced. Training runs in the poll loop (the consumer's
``max_poll_interval_ms`` covers a run); later learners move it to a worker.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from learners import artifacts
from learners.buffer import Example, ReplayBuffers
from learners.evaluation import evaluate_candidate
from learners.trainer import TrainConfig, train_adapter
from serving import metrics
from serving.artifacts import Artifact, load_artifact
from serving.compensator import CompensationConfig
from serving.encoder import Encoder
from streams.errors import InvalidEvent
from streams.kafka_io import KafkaConfig, make_consumer
from streams.redis_store import MemoryLog, RedisConfig, connect
from streams.registry_store import RegistryConflict, RegistryStore
from streams.schemas import ArtifactManifest, parse_feedback, parse_forget

log = logging.getLogger(__name__)

GROUP_ROLE = "learner"


@dataclass(frozen=True)
class LearnerPolicy:
    min_examples: int = 32
    retrain_every: int = 64
    holdout_frac: float = 0.2


@dataclass(frozen=True)
class RunReport:
    domain: str
    version: str
    submitted: bool
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
        self.registry = RegistryStore(client, redis_cfg)
        self.memory_log = MemoryLog(client, redis_cfg, encoder.fingerprint)
        self.buffers = ReplayBuffers(buffer_dir)
        self.reports: list[RunReport] = []
        self.unlearn: set[str] = set()  # domains whose adapter saw forgotten data: retrain from scratch

    # -- triggers ---------------------------------------------------------------------------------------
    def _enough(self, examples: list[Example]) -> bool:
        return len(examples) >= self.policy.min_examples and len({e.label for e in examples}) >= 2

    def due(self, domain: str) -> bool:
        examples = self.buffers.examples(domain)
        has_adapter = domain in self.registry.active()
        if domain in self.unlearn:
            if has_adapter and not self._enough(examples):
                # Too little data left to train without the forgotten examples: stop serving the adapter.
                with contextlib.suppress(RegistryConflict):
                    self.registry.withdraw(
                        domain, actor="learner", reason="adapter saw forgotten data; too little data left"
                    )
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
        version = self.registry.active().get(domain)
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
                "target_modules": sorted(trained.model.peft_config["default"].target_modules),
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
            scores["train_seconds"] = time.monotonic() - started
            artifacts.commit(staged, metrics=scores)
        except BaseException:
            artifacts.discard(staged)
            raise
        reason = "retrained without forgotten data" if unlearning else "new labels"
        self.registry.submit_candidate(
            domain,
            version,
            parent=manifest.parent,
            metrics=scores,
            reason=reason,
            unlearning=unlearning,
        )
        self.buffers.mark_trained(domain)
        self.unlearn.discard(domain)
        metrics.LEARNER_RUNS.labels("submitted").inc()
        metrics.LEARNER_SECONDS.observe(time.monotonic() - started)
        report = RunReport(domain, version, True, reason, scores)
        self.reports.append(report)
        log.info("domain %s candidate %s submitted (%s) %s", domain, version, reason, scores)
        return report

    def evaluate(
        self,
        domain: str,
        candidate: Artifact,
        parent: Artifact | None,
        train: list[Example],
        hold: list[Example],
    ) -> dict[str, float]:
        train_ids = {e.event_id for e in train}
        entries = [e for e in self.memory_log.iter_all() if e.domain == domain and e.event_id in train_ids]
        return evaluate_candidate(self.encoder, self.comp, domain, candidate, parent, train, hold, entries)

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
                        self.train_domain(domain)
                    except Exception:
                        metrics.LEARNER_RUNS.labels("failed").inc()
                        log.exception("training %s failed", domain)
                        self.buffers.mark_trained(domain)  # wait for more data before trying again
        finally:
            consumer.close(autocommit=False)
