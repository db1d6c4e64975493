"""The rollout controller: candidates -> verification -> offline gate -> shadow -> canary -> promote, or
rejection / rollback, every decision in the registry's audit log and on the Kafka rollout topic.

One controller runs per deployment. Each tick it

1. reads feedback labels (its own consumer group) and the replicas' online observations, joining them by
   request id into the current analysis window of each in-flight candidate;
2. takes new candidates: a candidate is verified with serving's loader (hashes, safetensors only, finite
   weights, shapes, base model) and passed through the offline gate; the newest one per domain starts,
   older waiting ones are superseded; an unlearning candidate replaces the served adapter directly;
3. analyses shadow stages (after ``shadow_seconds``, extended until ``min_requests`` answers make them
   conclusive) and canary intervals (every ``interval_s``):
   promote after ``passes`` passing intervals, roll back after ``failure_threshold`` failing ones
   (Flagger semantics), and times each rollback until every live replica has dropped the candidate;
4. forwards new audit records to Kafka (at least once, cursor in Redis) and updates the Prometheus gauges.

State lives in Redis (:mod:`streams.registry_store`), so a restarted controller resumes in-flight rollouts;
the analysis window it was filling starts afresh.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kafka.errors import KafkaError

from ops.rollout_policy import RolloutPolicy, Window, analyse, offline_gate
from serving import metrics
from serving.artifacts import load_artifact
from serving.errors import ArtifactRejected
from streams.errors import InvalidEvent, StoreUnavailable
from streams.kafka_io import KafkaConfig, make_consumer, make_producer
from streams.redis_store import RedisConfig, connect
from streams.registry_store import (
    RegistryConflict,
    RegistryStore,
    RolloutState,
    StaleEvaluation,
    VersionRecord,
)
from streams.schemas import parse_feedback

log = logging.getLogger(__name__)

GROUP_ROLE = "rollout"
ACTOR = "rollout-controller"
LABEL_CAPACITY = 200_000
PENDING_TTL_S = 900.0
STAGE_CODE = {"shadow": 1, "canary": 2}


@dataclass
class _Drain:
    domain: str
    version: str
    decided_at: float


@dataclass
class _Tracking:
    """Per in-flight candidate: the window being filled, and answers still waiting for their label."""

    version: str
    stage: str
    window: Window = field(default_factory=Window)
    pending: OrderedDict[str, tuple[float, dict[str, Any]]] = field(default_factory=OrderedDict)
    shadow_extended: bool = False  # the shadow outlived shadow_seconds for want of answers (audited once)


class RolloutController:
    def __init__(
        self,
        policy: RolloutPolicy,
        *,
        kafka: KafkaConfig,
        redis_cfg: RedisConfig,
        artifacts_dir: Path,
        base_fingerprint: str,
        dim: int,
        tick_s: float = 0.25,
    ) -> None:
        self.policy = policy
        self.kafka = kafka
        self.artifacts_dir = Path(artifacts_dir)
        self.base_fingerprint = base_fingerprint
        self.dim = dim
        self.tick_s = tick_s
        self.registry = RegistryStore(connect(redis_cfg), redis_cfg)
        self._labels: OrderedDict[str, str] = OrderedDict()  # request id -> true label
        self._tracking: dict[str, _Tracking] = {}
        self._drains: list[_Drain] = []
        self._obs_cursor = self.registry.observations_tail()
        self._known_domains: set[str] = set()

    # -- inputs -------------------------------------------------------------------------------------------
    def ingest_feedback(self, raw_values: list[bytes | None]) -> None:
        for raw in raw_values:
            try:
                event = parse_feedback(raw).event
            except InvalidEvent:
                continue  # the memory writer dead-letters it; nothing to join here
            if event.request_id is None:
                continue
            self._labels[event.request_id] = event.label
            while len(self._labels) > LABEL_CAPACITY:
                self._labels.popitem(last=False)
            for tracking in self._tracking.values():
                waiting = tracking.pending.pop(event.request_id, None)
                if waiting is not None:
                    tracking.window.add_label(waiting[1], event.label)

    def ingest_observations(self) -> None:
        while True:
            self._obs_cursor, batch = self.registry.observations_since(self._obs_cursor)
            if not batch:
                return
            for obs in batch:
                tracking = self._tracking.get(obs.get("domain", ""))
                if tracking is None or obs.get("candidate") != tracking.version:
                    continue
                if obs["variant"] not in {"stable", tracking.stage, "canary_error"}:
                    continue
                tracking.window.add_answer(obs)
                if obs["variant"] == "stable":
                    continue
                truth = self._labels.get(obs["rid"])
                if truth is not None:
                    tracking.window.add_label(obs, truth)
                else:
                    tracking.pending[obs["rid"]] = (time.monotonic(), obs)
            if len(batch) < 5000:
                return

    def _expire_pending(self) -> None:
        cutoff = time.monotonic() - PENDING_TTL_S
        for tracking in self._tracking.values():
            while tracking.pending:
                rid, (ts, _) = next(iter(tracking.pending.items()))
                if ts >= cutoff:
                    break
                del tracking.pending[rid]

    # -- candidates -----------------------------------------------------------------------------------------
    def take_candidates(self, rollouts: dict[str, RolloutState]) -> None:
        waiting: dict[str, list[VersionRecord]] = {}
        for record in self.registry.candidates():
            waiting.setdefault(record.domain, []).append(record)
        for domain, records in waiting.items():
            records.sort(key=lambda r: r.created_at)
            unlearning = [r for r in records if r.unlearning]
            if unlearning:
                self._replace_for_unlearning(
                    domain, unlearning[-1], [r for r in records if r is not unlearning[-1]]
                )
                continue
            if domain in rollouts:
                continue  # one rollout per domain at a time; the newest waiting candidate goes next
            newest = records[-1]
            for older in records[:-1]:
                self.registry.supersede(domain, older.version, by=newest.version, actor=ACTOR)
            self._start(domain, newest)

    def _verify(self, record: VersionRecord) -> str | None:
        try:
            load_artifact(
                self.artifacts_dir / record.domain / record.version,
                base_fingerprint=self.base_fingerprint,
                dim=self.dim,
            )
        except ArtifactRejected as exc:
            return exc.message
        return None

    def _replace_for_unlearning(
        self, domain: str, record: VersionRecord, others: list[VersionRecord]
    ) -> None:
        """An adapter that saw forgotten data must go now: its retrained successor skips the rollout,
        and any candidate or rollout trained before the forget is dropped."""
        for other in others:
            self.registry.supersede(domain, other.version, by=record.version, actor=ACTOR)
        rollout = self.registry.rollouts().get(domain)
        if rollout is not None:
            self.registry.rollback(domain, actor=ACTOR, reason=f"unlearning: {record.version} replaces it")
        problem = self._verify(record)
        if problem is not None:
            metrics.GATE_CHECKS.labels("integrity", "fail").inc()
            self.registry.reject(
                domain, record.version, actor=ACTOR, reason=f"integrity: {problem}", metrics={}
            )
            with contextlib.suppress(RegistryConflict):
                self.registry.withdraw(domain, actor=ACTOR, reason="unlearning candidate failed verification")
            return
        self.registry.promote(
            domain, record.version, actor=ACTOR, reason="unlearning: retrained without forgotten data"
        )

    def _start(self, domain: str, record: VersionRecord) -> None:
        problem = self._verify(record)
        metrics.GATE_CHECKS.labels("integrity", "fail" if problem else "pass").inc()
        if problem is not None:
            self.registry.reject(
                domain, record.version, actor=ACTOR, reason=f"integrity: {problem}", metrics={}
            )
            return
        decision = offline_gate(record.metrics, self.policy.gate_for(domain))
        for check in decision.checks:
            metrics.GATE_CHECKS.labels(check.name, "pass" if check.passed else "fail").inc()
        if not decision.passed:
            self.registry.reject(
                domain,
                record.version,
                actor=ACTOR,
                reason=f"offline gate: {decision.reason}",
                metrics=record.metrics,
            )
            return
        reason = f"offline gate passed: {decision.reason}"
        # The gate compared the candidate with what its evaluation measured as current; ``start`` checks
        # in its transaction that this is still what is served. If another version was promoted since
        # (the candidate waited behind its rollout), the figures say nothing: rejected as stale.
        shadow = self.policy.shadow_seconds > 0  # no shadow stage: straight to the canary
        try:
            self.registry.start(
                domain,
                record.version,
                "shadow" if shadow else "canary",
                shadow_share=self.policy.shadow_share if shadow else 0.0,
                weight=0.0 if shadow else self.policy.canary_weight,
                actor=ACTOR,
                reason=reason,
            )
        except StaleEvaluation as exc:
            metrics.GATE_CHECKS.labels("baseline", "fail").inc()
            self.registry.reject(
                domain, record.version, actor=ACTOR, reason=f"stale evaluation: {exc}", metrics=record.metrics
            )

    # -- in-flight rollouts -----------------------------------------------------------------------------
    def _track(self, rollouts: dict[str, RolloutState]) -> None:
        for domain in set(self._tracking) - set(rollouts):
            del self._tracking[domain]
        for domain, state in rollouts.items():
            tracking = self._tracking.get(domain)
            if tracking is None or (tracking.version, tracking.stage) != (state.version, state.stage):
                self._tracking[domain] = _Tracking(state.version, state.stage)

    def analyse_rollouts(self, rollouts: dict[str, RolloutState], now: float) -> None:
        for domain, state in rollouts.items():
            tracking = self._tracking[domain]
            if state.paused:
                tracking.window = Window()  # a resumed rollout is judged on fresh traffic
                continue
            if state.stage == "shadow":
                if now - state.stage_started_at >= self.policy.shadow_seconds:
                    self._end_shadow(domain, state, tracking)
            elif now - state.last_analysis_at >= self.policy.interval_s:
                self._canary_interval(domain, state, tracking)

    def _end_shadow(self, domain: str, state: RolloutState, tracking: _Tracking) -> None:
        verdict, reason, summary = analyse(tracking.window, self.policy)
        if verdict is None:
            # Too few mirrored answers (an idle domain, a replay still warming up): the shadow goes on,
            # its window still filling, until it can be judged. A canary never starts on a shadow that
            # saw nothing. The first extension is audited, later rounds only wait.
            if not tracking.shadow_extended:
                tracking.shadow_extended = True
                metrics.CANARY_ANALYSES.labels("shadow", "inconclusive").inc()
                self.registry.record_analysis(
                    domain, state.version, passed=None, reason=f"{reason}; shadow extended", metrics=summary
                )
                log.info("shadow of %s/%s extended: %s", domain, state.version, reason)
            return
        metrics.CANARY_ANALYSES.labels("shadow", _verdict(verdict)).inc()
        event = self.registry.record_analysis(
            domain, state.version, passed=verdict, reason=reason, metrics=summary
        )
        if verdict is False:
            self._rollback(domain, state, f"shadow failed: {reason}", summary)
            return
        self.registry.start(
            domain,
            state.version,
            "canary",
            weight=self.policy.canary_weight,
            actor=ACTOR,
            reason=f"shadow done ({event.reason})",
            metrics=summary,
        )

    def _canary_interval(self, domain: str, state: RolloutState, tracking: _Tracking) -> None:
        window, tracking.window = tracking.window, Window()
        verdict, reason, summary = analyse(window, self.policy)
        metrics.CANARY_ANALYSES.labels("canary", _verdict(verdict)).inc()
        self.registry.record_analysis(
            domain, state.version, passed=verdict, reason=reason, metrics=summary, audit=verdict is not None
        )
        passes = state.passes + (verdict is True)
        failures = state.failures + (verdict is False)
        if failures >= self.policy.failure_threshold:
            self._rollback(
                domain,
                state,
                f"{failures} failed intervals (threshold {self.policy.failure_threshold}): {reason}",
                summary,
            )
        elif passes >= self.policy.passes:
            self.registry.promote(
                domain,
                state.version,
                actor=ACTOR,
                reason=f"canary passed {passes} intervals at weight {state.weight}",
                metrics=summary,
                from_rollout=True,
            )

    def _rollback(self, domain: str, state: RolloutState, reason: str, summary: dict[str, float]) -> None:
        self.registry.rollback(domain, actor=ACTOR, reason=reason, metrics=summary, version=state.version)
        self._drains.append(_Drain(domain, state.version, time.time()))

    def check_drains(self) -> None:
        """A rollback is complete when every live replica has synced after it without the candidate."""
        if not self._drains:
            return
        replicas = self.registry.replicas()
        still = []
        for drain in self._drains:
            serving = [
                r
                for r in replicas.values()
                if r["ts"] < drain.decided_at or r["rollout"].get(drain.domain) == drain.version
            ]
            if serving and time.time() - drain.decided_at < 120:
                still.append(drain)
                continue
            elapsed = time.time() - drain.decided_at
            metrics.ROLLBACK_DRAIN.observe(elapsed)
            log.info("rollback of %s/%s drained in %.2f s", drain.domain, drain.version, elapsed)
        self._drains = still

    # -- outputs ------------------------------------------------------------------------------------------
    def forward_audit(self, producer) -> int:
        """Send new audit records to the Kafka rollout topic (at least once: the cursor moves after acks)."""
        cursor = self.registry.forward_cursor()
        batch = self.registry.audit_since(cursor)
        if not batch:
            return 0
        futures = [
            producer.send(self.kafka.rollout_topic, key=event.domain.encode(), value=event.to_bytes())
            for _, event in batch
        ]
        for future in futures:
            future.get(timeout=10)
        for _, event in batch:
            metrics.ROLLOUT_TRANSITIONS.labels(event.type).inc()
        self.registry.set_forward_cursor(batch[-1][0])
        return len(batch)

    def export_gauges(self, rollouts: dict[str, RolloutState]) -> None:
        self._known_domains |= set(rollouts)
        for domain in self._known_domains:
            state = rollouts.get(domain)
            metrics.ROLLOUT_STAGE.labels(domain).set(STAGE_CODE[state.stage] if state else 0)
            metrics.ROLLOUT_WEIGHT.labels(domain).set(state.weight if state else 0.0)

    # -- the loop -----------------------------------------------------------------------------------------
    def step(self, producer=None) -> None:
        rollouts = self.registry.rollouts()
        self._track(rollouts)
        self.ingest_observations()
        self._expire_pending()
        self.analyse_rollouts(rollouts, time.time())
        self.take_candidates(self.registry.rollouts())
        rollouts = self.registry.rollouts()
        self._track(rollouts)
        self.check_drains()
        self.export_gauges(rollouts)
        if producer is not None:
            self.forward_audit(producer)

    def run(self, stop: threading.Event, on_ready=None) -> None:
        consumer = make_consumer(self.kafka, self.kafka.group(GROUP_ROLE), [self.kafka.feedback_topic])
        producer = make_producer(self.kafka)
        try:
            while not stop.is_set():
                polled = consumer.poll(timeout_ms=int(self.tick_s * 1000))
                if on_ready is not None and consumer.assignment():
                    on_ready()
                    on_ready = None
                records = [r for batch in polled.values() for r in batch]
                if records:
                    self.ingest_feedback([r.value for r in records])
                try:
                    self.step(producer)
                except (StoreUnavailable, KafkaError) as exc:
                    log.warning("rollout controller round failed, retrying: %s", exc)
                    stop.wait(1.0)
                except RegistryConflict as exc:  # an operator acted at the same moment; re-read next tick
                    log.info("rollout transition skipped: %s", exc)
                if records:
                    consumer.commit()  # labels only feed online analysis; losing some on a crash is harmless
        finally:
            consumer.close(autocommit=False)
            producer.close(timeout=5)


def _verdict(passed: bool | None) -> str:
    return {True: "pass", False: "fail", None: "inconclusive"}[passed]
