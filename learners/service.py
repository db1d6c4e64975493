"""The learner service: feedback stream -> replay buffers -> candidate adapter -> evaluation with
serving's own Predictor -> atomic publish -> registered as a candidate. The rollout controller (ops)
gates it and rolls it out; learners never change what is served.

Offsets are committed after the buffer append is fsynced. Training runs on one worker thread, so the
poll loop keeps polling and committing (a training run may take longer than ``max_poll_interval_ms``).

Triggers, per domain (``due``): no adapter yet and enough data; ``retrain_every`` new labels; a drift alarm
(Page-Hinkley on a proxy's prequential error, ``learners.drift``) after at least ``min_new_after_drift``
new labels; a schedule (``max_interval_s`` since the last run, if anything new arrived); and a forget
event that touched data the adapter saw (retrained from scratch without it). Apart from a forget, a domain
whose last candidate is still queued or rolling out waits for the decision (``max_rollout_wait_s``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from learners import artifacts
from learners.buffer import Example, ReplayBuffers
from learners.drift import DriftMonitor
from learners.evaluation import evaluate_candidate
from learners.interpolation import choose_alpha_on
from learners.trainer import TrainConfig, TrainingInterrupted, replay_mix, train_adapter
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
# Evaluations of one candidate against a newly served version (each takes as long as the first one; a
# candidate still behind after these is left to the controller, which rejects a stale evaluation).
MAX_REEVALUATIONS = 2


@dataclass(frozen=True)
class LearnerPolicy:
    min_examples: int = 32
    retrain_every: int = 64
    holdout_frac: float = 0.2
    min_new_after_drift: int = 16
    max_interval_s: float | None = 3600.0
    # While this learner's last candidate of a domain is with the rollout controller (queued, shadow or
    # canary), the next run waits for it, up to this long: then it continues from what the rollout
    # promoted (replay share, distillation toward it) instead of training beside it from an outdated
    # parent. 0: never wait.
    max_rollout_wait_s: float = 600.0


ROLLOUT_PENDING = frozenset({"candidate", "shadow", "canary"})  # registry states before a decision


@dataclass
class _DomainState:
    drift: DriftMonitor = field(default_factory=DriftMonitor)
    drifted: bool = False
    last_run: float = field(default_factory=time.monotonic)
    pending: tuple[str, float] | None = None  # (version, monotonic time) of the last candidate submitted


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
        self._attempted: set[str] = set()  # domains trained since this process started
        self.unlearn: set[str] = set()  # domains whose adapter saw forgotten data: retrain from scratch
        self._state: dict[str, _DomainState] = {}
        self._lock = threading.Lock()  # guards unlearn, _state and _queued between poll thread and worker
        self._queued: set[str] = set()
        self._jobs: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._stop: threading.Event | None = None  # set by run(): a shutdown interrupts a training run

    # -- triggers ---------------------------------------------------------------------------------------
    def _enough(self, examples: list[Example]) -> bool:
        return len(examples) >= self.policy.min_examples and len({e.label for e in examples}) >= 2

    def _domain(self, domain: str) -> _DomainState:
        st = self._state.get(domain)
        if st is None:
            st = self._state[domain] = _DomainState()
        return st

    def trigger(self, domain: str) -> str | None:
        """Why ``domain`` should train now, or None."""
        examples = self.buffers.examples(domain)
        has_adapter = domain in self.registry.active()
        with self._lock:
            unlearning = domain in self.unlearn
            st = self._domain(domain)
        if unlearning:
            if has_adapter and not self._enough(examples):
                # Too little data left to train without the forgotten examples: stop serving the adapter.
                with contextlib.suppress(RegistryConflict):
                    self.registry.withdraw(
                        domain, actor="learner", reason="adapter saw forgotten data; too little data left"
                    )
                log.info("domain %s: adapter withdrawn after forget (too little data left)", domain)
            if not has_adapter or not self._enough(examples):
                with self._lock:
                    self.unlearn.discard(domain)
                return None
            return "retrained without forgotten data"
        if not self._enough(examples):
            return None
        if self._awaiting_rollout(domain, st):
            return None
        new = self.buffers.new_since_train(domain)
        if new >= self.policy.retrain_every:
            return "new labels"
        # A first candidate once per process; after that, new data decides (the rollout controller may
        # take minutes to promote it, and retraining on the same examples meanwhile helps nobody).
        if not has_adapter and domain not in self._attempted:
            return "first adapter"
        if st.drifted and new >= self.policy.min_new_after_drift:
            return "drift"
        interval = self.policy.max_interval_s
        if interval is not None and new > 0 and time.monotonic() - st.last_run >= interval:
            return "schedule"
        return None

    def _awaiting_rollout(self, domain: str, st: _DomainState) -> bool:
        """Whether this process's last candidate of ``domain`` is still queued or rolling out, for at
        most ``policy.max_rollout_wait_s`` since it was submitted (see ``LearnerPolicy``)."""
        if st.pending is None:
            return False
        version, since = st.pending
        if time.monotonic() - since < self.policy.max_rollout_wait_s:
            record = self.registry.get(domain, version)
            if record is not None and record.state in ROLLOUT_PENDING:
                return True
        st.pending = None
        return False

    def due(self, domain: str) -> bool:
        return self.trigger(domain) is not None

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

    def train_domain(self, domain: str, reason: str | None = None) -> RunReport:
        started = time.monotonic()
        with self._lock:
            unlearning = domain in self.unlearn
            st = self._domain(domain)
            st.drifted, st.last_run = False, started
        snapshot, generation, consumed = self.buffers.snapshot(domain)
        examples = sorted(snapshot, key=lambda e: e.ts)
        n_hold = int(len(examples) * self.policy.holdout_frac)
        train, hold = (examples[:-n_hold], examples[-n_hold:]) if n_hold else (examples, [])
        parent = self.current(domain)
        share = self.train_cfg.replay_share
        if parent is not None and not unlearning and share is not None:
            # What the previous run trained on ended where this snapshot's first ``n_prev`` examples
            # minus their holdout end; the rest of the training part is new to the parent.
            n_prev = len(examples) - consumed
            start = max(0, n_prev - int(n_prev * self.policy.holdout_frac))
            train = replay_mix(train[start:], train[:start], share, self.train_cfg.seed)
        log.info(
            "domain %s: training on %d examples (%d held out) from %s%s",
            domain,
            len(train),
            len(hold),
            parent.manifest.version if parent is not None else "the base model",
            " (unlearning)" if unlearning else "",
        )
        # Exact unlearning at adapter scope: an adapter that saw forgotten data is not a starting point.
        trained = train_adapter(
            self.encoder,
            [e.text for e in train],
            [e.label for e in train],
            self.train_cfg,
            parent=None if unlearning else parent,
            should_stop=self._stop.is_set if self._stop is not None else None,
        )
        if self._stop is not None and self._stop.is_set():  # trained to the end as the shutdown came
            raise TrainingInterrupted("stopped before evaluation")
        alpha = None
        if parent is not None and not unlearning:
            alpha = choose_alpha_on(self.encoder, trained, parent, hold, self.train_cfg.interpolation_grid)
        version = artifacts.new_version()
        manifest = ArtifactManifest(
            domain=domain,
            version=version,
            parent=parent.manifest.version if parent else None,
            base_fingerprint=self.encoder.fingerprint,
            labels=trained.labels,
            files={},
            lora=trained.lora_manifest(),
            data_window={
                "n_train": len(train),
                "n_holdout": len(hold),
                "from_ts": examples[0].ts,
                "to_ts": examples[-1].ts,
            },
        )
        write = trained.write
        if parent is not None and not unlearning and self.train_cfg.guard:
            write = artifacts.with_guard(trained.write, parent)  # margin fitted in evaluate_candidate
        staged = artifacts.stage(self.artifacts_dir, manifest, write)
        try:
            candidate = load_artifact(staged, base_fingerprint=self.encoder.fingerprint, dim=self.encoder.dim)
            scores = self.evaluate(domain, candidate, parent, train, hold)
            against = parent
            if not unlearning and not self.train_cfg.guard:  # a guard is bound to its parent
                against, scores = self._against_served(domain, candidate, parent, train, hold, scores)
            scores["train_steps"] = float(trained.steps)
            scores["train_loss"] = trained.final_loss
            scores["train_seconds"] = time.monotonic() - started
            if alpha is not None:
                scores["interpolation_alpha"] = alpha
            if self.buffers.generation(domain) != generation:
                # A forget arrived while this run trained on the old snapshot: never ship what it saw.
                artifacts.discard(staged)
                with self._lock:
                    self.unlearn.add(domain)
                metrics.LEARNER_RUNS.labels("discarded").inc()
                report = RunReport(domain, version, False, "forget arrived during training", scores)
                self.reports.append(report)
                return report
            artifacts.commit(staged, metrics=scores)
        except BaseException:
            artifacts.discard(staged)
            raise
        reason = "retrained without forgotten data" if unlearning else (reason or "new labels")
        self.registry.submit_candidate(
            domain,
            version,
            parent=manifest.parent,
            metrics=scores,
            reason=reason,
            unlearning=unlearning,
            evaluated_against=None if against is parent else _version(against),
        )
        self.buffers.mark_trained(domain, consumed)
        with self._lock:
            self._attempted.add(domain)
            st.pending = (version, time.monotonic())
            if self.buffers.generation(domain) == generation:
                self.unlearn.discard(domain)
        metrics.LEARNER_RUNS.labels("submitted").inc()
        metrics.LEARNER_SECONDS.observe(time.monotonic() - started)
        report = RunReport(domain, version, True, reason, scores)
        self.reports.append(report)
        log.info("domain %s candidate %s submitted (%s) %s", domain, version, reason, scores)
        return report

    def _against_served(
        self,
        domain: str,
        candidate: Artifact,
        parent: Artifact | None,
        train: list[Example],
        hold: list[Example],
        scores: dict[str, float],
    ) -> tuple[Artifact | None, dict[str, float]]:
        """The run compared its candidate with the version served when it started. If another one was
        promoted meanwhile (the previous candidate's rollout ended while this one trained), the
        comparison is done again against it: the gate judges a candidate against what is served."""
        against = parent
        for _ in range(MAX_REEVALUATIONS):
            if self.registry.active().get(domain, "") == _version(against):
                break  # the usual case: one registry read, no artifact loaded
            served = self.current(domain)
            if _version(served) == _version(against):
                break
            log.info(
                "domain %s: %s is served now (the run started from %s): evaluating again against it",
                domain,
                _version(served) or "the memory alone",
                _version(against) or "the memory alone",
            )
            against, scores = served, self.evaluate(domain, candidate, served, train, hold)
            metrics.LEARNER_REEVALUATIONS.inc()
        return against, scores

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
        return evaluate_candidate(
            self.encoder,
            self.comp,
            domain,
            candidate,
            parent,
            train,
            hold,
            entries,
            guard_margin=self.train_cfg.guard_margin,
            should_stop=self._stop.is_set if self._stop is not None else None,
        )

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
                        with self._lock:
                            self.unlearn.add(domain)
                    metrics.FEEDBACK_CONSUMED.labels("learner", "forget").inc()
                else:
                    events.append(parse_feedback(rec.value).event)
            except InvalidEvent:
                metrics.FEEDBACK_CONSUMED.labels("learner", "invalid").inc()
        self.buffers.add(events)
        metrics.FEEDBACK_CONSUMED.labels("learner", "applied").inc(len(events))
        with self._lock:
            for e in events:
                st = self._domain(e.domain)
                if st.drift.observe(e.text, e.label):
                    st.drifted = True
                    log.info("domain %s: drift alarm on the prequential error", e.domain)

    def _work(self, stop: threading.Event) -> None:
        """The training worker: one run at a time, domains in the order they became due."""
        while not stop.is_set():
            try:
                item = self._jobs.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            domain, reason = item
            try:
                self.train_domain(domain, reason)
            except TrainingInterrupted as exc:  # shutting down: the domain stays due for the next start
                metrics.LEARNER_RUNS.labels("interrupted").inc()
                log.info("training %s interrupted by shutdown (%s)", domain, exc)
            except Exception:
                metrics.LEARNER_RUNS.labels("failed").inc()
                log.exception("training %s failed", domain)
                self.buffers.mark_trained(domain)  # wait for more data before trying again
                with self._lock:
                    self._attempted.add(domain)
            finally:
                with self._lock:
                    self._queued.discard(domain)

    def schedule(self) -> list[str]:
        """Queue every due domain that is not queued or training already; returns those queued now."""
        queued = []
        for domain in self.buffers.domains():
            with self._lock:
                if domain in self._queued:
                    continue
            reason = self.trigger(domain)
            if reason is None:
                continue
            with self._lock:
                self._queued.add(domain)
            self._jobs.put((domain, reason))
            queued.append(domain)
        return queued

    def run(self, stop: threading.Event, on_ready=None) -> None:
        self._stop = stop
        consumer = make_consumer(
            self.kafka, self.kafka.group(GROUP_ROLE), [self.kafka.feedback_topic, self.kafka.forget_topic]
        )
        worker = threading.Thread(target=self._work, args=(stop,), name="learner-train", daemon=True)
        worker.start()
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
                self.schedule()
        finally:
            self._jobs.put(None)
            consumer.close(autocommit=False)
            worker.join(timeout=60)


def _version(artifact: Artifact | None) -> str:
    """An artifact's version; "" for none (the memory alone)."""
    return artifact.manifest.version if artifact is not None else ""
