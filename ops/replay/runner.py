"""The prequential (test-then-train) loop against a live deployment.

Warm-up events reach the system only as feedback. Then, per event in ts order: wait for its slot
(pacing), predict over HTTP, record the answer, and only then send its label as feedback. The label of
an event is never sent before that event's prediction has come back (or failed), which is what makes
the accuracy honest; a unit test and an integration test check it.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ops.replay.pacing import Pacer
from ops.replay.probes import (
    FixSample,
    FixSampler,
    Rollout,
    RolloutTracker,
    measure_fix,
    near_duplicate,
    probe_answer,
)
from ops.replay.stream import StreamEvent
from ops.replay.transport import Answer, FeedbackSink, PredictClient, TransportError
from streams.schemas import DEFAULT_DOMAIN, FeedbackEvent

MAX_ERROR_EXAMPLES = 20


class ReplayAborted(RuntimeError):
    """The deployment stopped answering; the partial result is still reported."""


@dataclass(frozen=True)
class RunnerConfig:
    hide_domain: bool = False
    fix_samples: int = 20
    fix_timeout_s: float = 10.0
    fix_max_probes: int = 60
    rollout_probe_size: int = 32
    rollout_probe_every: int = 500
    warmup_timeout_s: float | None = None  # None: 60 s plus 0.1 s per warm-up event
    wait_adapter_s: float = 0.0
    max_consecutive_errors: int = 50
    drain_every: int = 200
    seed: int = 0


@dataclass
class Outcome:
    """One evaluated event: what the system answered before the label was revealed."""

    position: int
    event_id: str
    domain: str | None
    label: str
    predicted: str | None
    model_version: str | None
    adapter: str | None
    compensated: bool
    latency_s: float | None
    error: str | None
    predicted_at: float  # wall clock (epoch) when the answer came back or the request failed
    feedback_at: float | None = None  # wall clock when the label was handed to the producer


@dataclass
class ReplayResult:
    n_warmup: int
    outcomes: list[Outcome] = field(default_factory=list)
    fixes: list[FixSample] = field(default_factory=list)
    rollouts: list[Rollout] = field(default_factory=list)
    background_flips: dict[str, float | int | None] = field(default_factory=dict)
    version_reverts: int = 0
    probe_requests: int = 0
    errors: Counter = field(default_factory=Counter)
    error_examples: list[dict[str, Any]] = field(default_factory=list)
    warmup: dict[str, Any] = field(default_factory=dict)
    pacing: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    aborted: str | None = None


class ReplayRunner:
    def __init__(
        self,
        client: PredictClient,
        sink: FeedbackSink,
        cfg: RunnerConfig,
        pacer: Pacer | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        progress: bool = True,
    ) -> None:
        self.client = client
        self.sink = sink
        self.cfg = cfg
        self.pacer = pacer or Pacer(clock=clock, sleep=sleep)
        self.clock, self.wall, self.sleep = clock, wall, sleep
        self.progress = progress
        self.rng = random.Random(cfg.seed)

    # -- helpers --------------------------------------------------------------------------------------
    def _error(self, result: ReplayResult, kind: str, message: str, event_id: str | None) -> None:
        result.errors[kind] += 1
        if len(result.error_examples) < MAX_ERROR_EXAMPLES:
            result.error_examples.append({"kind": kind, "event_id": event_id, "message": message[:300]})

    def _request_domain(self, event: StreamEvent) -> str | None:
        return None if self.cfg.hide_domain else event.domain

    def _feedback(self, result: ReplayResult, event: StreamEvent, request_id: str | None) -> float | None:
        fb = FeedbackEvent(
            event_id=event.id,
            text=event.text,
            label=event.label,
            domain=event.domain or DEFAULT_DOMAIN,
            request_id=request_id,
        )
        try:
            self.sink.send(fb)
        except TransportError as exc:
            self._error(result, exc.kind, exc.message, event.id)
            return None
        return self.wall()

    def _drain(self, result: ReplayResult) -> None:
        for event_id, message in self.sink.drain_failures():
            self._error(result, "feedback_kafka", message, event_id)

    # -- phases ---------------------------------------------------------------------------------------
    def _warm_up(self, result: ReplayResult, events: list[StreamEvent]) -> None:
        t0 = self.clock()
        health = self.client.health()
        before = health.get("memory_entries") if health else None
        for event in events:
            self._feedback(result, event, None)
        self.sink.flush()
        self._drain(result)
        info: dict[str, Any] = {"events": len(events), "memory_entries_before": before}
        if events and isinstance(before, int):
            wanted = before + len(events)
            timeout = self.cfg.warmup_timeout_s
            if timeout is None:
                timeout = 60.0 + 0.1 * len(events)
            entries = before
            while self.clock() - t0 < timeout:
                health = self.client.health()
                entries = health.get("memory_entries", entries) if health else entries
                if isinstance(entries, int) and entries >= wanted:
                    break
                self.sleep(0.25)
            info.update(memory_entries_after=entries, absorbed=entries >= wanted)
            if entries < wanted:
                self._error(
                    result,
                    "warmup_not_absorbed",
                    f"after {timeout:.0f}s the memory holds {entries} entries, expected {wanted}",
                    None,
                )
        elif events:
            info["absorbed"] = None  # the deployment does not report memory_entries: nothing to wait on
        if self.cfg.wait_adapter_s > 0 and events:
            # A domain whose warm-up holds a single label cannot have a classifier yet (the learner
            # needs two): waiting for it would only burn the whole wait.
            labels: dict[str, set[str]] = {}
            for e in events:
                labels.setdefault(e.domain or DEFAULT_DOMAIN, set()).add(e.label)
            domains = {d for d, seen in labels.items() if len(seen) >= 2}
            info["adapter_wait_domains"] = sorted(domains)
            t1 = self.clock()
            adapters: dict[str, Any] = {}
            while self.clock() - t1 < self.cfg.wait_adapter_s:
                health = self.client.health() or {}
                adapters = health.get("adapters") or {}
                if domains <= set(adapters):
                    break
                self.sleep(1.0)
            info["adapters_after_warmup"] = dict(adapters)
            info["adapter_wait_s"] = round(self.clock() - t1, 3)
        info["seconds"] = round(self.clock() - t0, 3)
        result.warmup = info

    def run(self, events: list[StreamEvent], n_warmup: int) -> ReplayResult:
        """Replay ``events`` (sorted by ts); the first ``n_warmup`` are feedback only."""
        if not 0 <= n_warmup < len(events):
            raise ValueError(f"n_warmup must be in [0, {len(events)}), got {n_warmup}")
        result = ReplayResult(n_warmup=n_warmup)
        self._warm_up(result, events[:n_warmup])
        evaluated = events[n_warmup:]
        keys = [self._request_domain(e) or DEFAULT_DOMAIN for e in evaluated]

        def probe(position: int) -> Answer | None:
            result.probe_requests += 1
            e = evaluated[position]
            answer, kind = probe_answer(self.client, e.text, self._request_domain(e))
            if kind is not None:
                self._error(result, f"probe_{kind}", "rollout probe failed", e.id)
            return answer

        tracker = RolloutTracker(
            keys,
            [e.label for e in evaluated],
            probe,
            size=self.cfg.rollout_probe_size,
            every=self.cfg.rollout_probe_every,
        )
        sampler = FixSampler(len(evaluated), self.cfg.fix_samples)
        t0 = self.clock()
        bar = _progress(len(evaluated), self.progress)
        consecutive = correct = 0
        try:
            for pos, event in enumerate(evaluated):
                self.pacer.wait(event.ts)
                answer, latency, error = self._predict(result, event)
                outcome = Outcome(
                    position=pos,
                    event_id=event.id,
                    domain=event.domain,
                    label=event.label,
                    predicted=answer.label if answer else None,
                    model_version=answer.model_version if answer else None,
                    adapter=answer.adapter if answer else None,
                    compensated=answer.compensated if answer else False,
                    latency_s=latency,
                    error=error,
                    predicted_at=self.wall(),
                )
                result.outcomes.append(outcome)
                if answer is not None:
                    tracker.observe(pos, keys[pos], answer, event.id, self.clock() - t0)
                fix = None
                if outcome.predicted != event.label and sampler.wants(pos):
                    fix = self._pre_fix(result, event, outcome)
                    if fix is not None:
                        sampler.take(pos)
                # The label leaves only now, after the prediction above came back or failed.
                outcome.feedback_at = self._feedback(result, event, answer.request_id if answer else None)
                if fix is not None:
                    self._follow_fix(result, fix, event)
                consecutive = consecutive + 1 if error else 0
                correct += int(outcome.predicted == event.label)
                if pos % self.cfg.drain_every == 0:
                    self._drain(result)
                if bar is not None:
                    bar.update(1)
                    if pos % 25 == 0:
                        bar.set_postfix(acc=f"{correct / (pos + 1):.3f}", errors=sum(result.errors.values()))
                if consecutive >= self.cfg.max_consecutive_errors:
                    raise ReplayAborted(
                        f"{consecutive} predictions in a row failed (last: {error}); is the deployment up?"
                    )
        except ReplayAborted as exc:
            result.aborted = str(exc)
        except KeyboardInterrupt:
            result.aborted = "interrupted (Ctrl-C); the report covers the events replayed so far"
        finally:
            if bar is not None:
                bar.close()
            replay_s = self.clock() - t0
            try:
                self.sink.flush()
            except TransportError as exc:
                self._error(result, exc.kind, exc.message, None)
            self._drain(result)
        result.rollouts = tracker.rollouts
        result.background_flips = tracker.background.rates()
        result.version_reverts = tracker.reverts
        done = len(result.outcomes)
        result.pacing = {
            "mode": self.pacer.mode,
            "events_per_s": done / replay_s if replay_s > 0 else None,
            "max_lag_s": round(self.pacer.max_lag_s, 3),
        }
        result.timings_s = {"warmup": result.warmup.get("seconds", 0.0), "replay": round(replay_s, 3)}
        return result

    def _predict(
        self, result: ReplayResult, event: StreamEvent
    ) -> tuple[Answer | None, float | None, str | None]:
        start = self.clock()
        try:
            answer = self.client.predict(event.text, self._request_domain(event))
        except TransportError as exc:
            self._error(result, exc.kind, exc.message, event.id)
            return None, None, exc.kind
        return answer, self.clock() - start, None

    def _pre_fix(self, result: ReplayResult, event: StreamEvent, outcome: Outcome) -> FixSample | None:
        """Before the label is revealed, check the near-duplicate is wrong too: otherwise there is
        nothing for the feedback to fix and the sample would measure nothing."""
        text = near_duplicate(event.text, self.rng)
        result.probe_requests += 1
        answer, kind = probe_answer(self.client, text, self._request_domain(event))
        if answer is None:
            self._error(result, f"probe_{kind}", "feedback-to-fix probe failed", event.id)
            return None
        if answer.label == event.label:
            return None
        return FixSample(
            index=outcome.position,
            event_id=event.id,
            label=event.label,
            predicted=outcome.predicted,
            probe_text=text,
            pre_label=answer.label,
        )

    def _follow_fix(self, result: ReplayResult, fix: FixSample, event: StreamEvent) -> None:
        sent_at = self.clock()
        try:
            self.sink.flush()  # the clock runs from the send; do not let producer batching add to it
        except TransportError as exc:
            self._error(result, exc.kind, exc.message, event.id)
        measure_fix(
            self.client,
            fix,
            self._request_domain(event),
            timeout_s=self.cfg.fix_timeout_s,
            max_probes=self.cfg.fix_max_probes,
            clock=self.clock,
            sleep=self.sleep,
            sent_at=sent_at,
        )
        result.probe_requests += fix.probes
        result.fixes.append(fix)


def _progress(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="replay", unit="ev", dynamic_ncols=True, mininterval=0.5)
