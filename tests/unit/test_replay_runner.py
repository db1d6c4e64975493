"""The prequential loop over fakes on a fake clock: ordering (no label before its prediction), warm-up,
errors, pacing, rollout flips and feedback-to-fix. The fakes here are reused by the CLI test."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter
from dataclasses import dataclass, field

import pytest

from ops.replay.pacing import Pacer
from ops.replay.probes import FixSampler, near_duplicate
from ops.replay.runner import ReplayRunner, RunnerConfig
from ops.replay.stream import StreamEvent
from ops.replay.transport import Answer, TransportError
from streams.schemas import FeedbackEvent


@dataclass
class FakeClock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


def words(text: str) -> set[str]:
    return set(text.lower().split())


@dataclass
class FakeSystem:
    """Predicts the label of the most similar fed-back text (word Jaccard >= 0.6), else the majority
    label; a label becomes visible ``absorb_s`` after it was sent. ``version_every`` feedbacks promote a
    new model version, which from then on answers ``new_model_label`` for unknown texts."""

    clock: FakeClock
    absorb_s: float = 0.0
    latency_s: float = 0.01
    version_every: int | None = None
    new_model_label: str | None = None
    fail_texts: set[str] = field(default_factory=set)
    log: list[tuple] = field(default_factory=list)
    received: list[tuple[float, FeedbackEvent]] = field(default_factory=list)
    version: int = 1
    _ids: itertools.count = field(default_factory=itertools.count)

    # PredictClient
    def predict(self, text: str, domain: str | None) -> Answer:
        self.clock.sleep(self.latency_s)
        request_id = f"r{next(self._ids)}"
        self.log.append(("predict", request_id, text, domain, self.clock()))
        if text in self.fail_texts:
            raise TransportError("predict_http_500", "internal error")
        visible = [fb for t, fb in self.received if self.clock() - t >= self.absorb_s]
        best, best_sim = None, 0.0
        for fb in visible:
            a, b = words(text), words(fb.text)
            sim = len(a & b) / len(a | b)
            if sim > best_sim:
                best, best_sim = fb.label, sim
        if best is not None and best_sim >= 0.6:
            label = best
        elif self.version > 1 and self.new_model_label is not None:
            label = self.new_model_label
        else:
            counts = Counter(fb.label for fb in visible)
            label = counts.most_common(1)[0][0] if counts else None
        return Answer(label, {}, f"base/d@{self.version}", None, best_sim >= 0.6, request_id)

    def health(self) -> dict:
        visible = sum(1 for t, _ in self.received if self.clock() - t >= self.absorb_s)
        return {"memory_entries": visible}

    # FeedbackSink
    def send(self, event: FeedbackEvent) -> None:
        self.log.append(("feedback", event.event_id, event.request_id, event.domain, self.clock()))
        self.received.append((self.clock(), event))
        if self.version_every and len(self.received) % self.version_every == 0:
            self.version += 1

    def flush(self) -> None:
        pass

    def drain_failures(self) -> list[tuple[str, str]]:
        return []


def make_events(n: int, domains: tuple[str, ...] = ("d",)) -> list[StreamEvent]:
    """Texts of two topics (label a / b), each repeated with small variations, so memory helps."""
    events = []
    for i in range(n):
        label = "a" if i % 3 else "b"
        topic = "alpha apple avocado almond" if label == "a" else "banana berry blueberry bread"
        text = f"{topic} item {i % 7} number {i % 5} extra words here id{i}"
        events.append(StreamEvent(f"e{i}", float(i), text, label, domains[i % len(domains)], i + 1))
    return events


def runner(system: FakeSystem, clock: FakeClock, **cfg) -> ReplayRunner:
    config = RunnerConfig(**{"fix_samples": 0, "rollout_probe_size": 0, **cfg})
    return ReplayRunner(
        system,
        system,
        config,
        Pacer(clock=clock, sleep=clock.sleep),
        clock=clock,
        wall=clock,
        sleep=clock.sleep,
        progress=False,
    )


def test_no_label_reaches_the_system_before_its_prediction() -> None:
    clock = FakeClock()
    system = FakeSystem(clock, absorb_s=0.05, version_every=25, new_model_label="b")
    events = make_events(120)
    result = runner(system, clock, fix_samples=5, rollout_probe_size=4, rollout_probe_every=10).run(
        events, 12
    )

    warm = {e.id for e in events[:12]}
    text_of = {e.id: e.text for e in events}
    position = {entry[1]: i for i, entry in enumerate(system.log) if entry[0] == "predict"}
    feedback_at = {}
    for i, entry in enumerate(system.log):
        if entry[0] != "feedback":
            continue
        _, event_id, request_id, _domain, _t = entry
        assert event_id not in feedback_at, "each label is sent exactly once"
        feedback_at[event_id] = i
        if event_id in warm:
            assert request_id is None
            continue
        # The feedback names the request that made the counted prediction: it came first, on this text.
        assert request_id in position and position[request_id] < i
        assert system.log[position[request_id]][2] == text_of[event_id]
    assert set(feedback_at) == {e.id for e in events}
    # Test-then-train in stream order: event i's label is out before event i+1's counted prediction.
    counted = result.outcomes
    for prev, nxt in itertools.pairwise(counted):
        assert prev.feedback_at is not None and prev.feedback_at <= nxt.predicted_at
    for o in counted:
        assert o.predicted_at <= o.feedback_at
    # No warm-up text was ever predicted.
    predicted_texts = {entry[2] for entry in system.log if entry[0] == "predict"}
    assert not predicted_texts & {e.text for e in events[:12]}
    assert result.probe_requests > 0 and len(result.outcomes) == 108


def test_warmup_is_feedback_only_and_waits_until_absorbed() -> None:
    clock = FakeClock()
    system = FakeSystem(clock, absorb_s=2.0)
    events = make_events(40)
    result = runner(system, clock).run(events, 10)
    first_predict = next(i for i, e in enumerate(system.log) if e[0] == "predict")
    assert [e[0] for e in system.log[:first_predict]] == ["feedback"] * 10
    assert result.warmup["absorbed"] is True
    assert result.warmup["memory_entries_after"] == 10
    assert system.log[first_predict][4] >= 2.0  # predictions start once the warm-up is visible


def test_warmup_not_absorbed_is_reported_not_fatal() -> None:
    clock = FakeClock()
    system = FakeSystem(clock, absorb_s=1e9)
    result = runner(system, clock, warmup_timeout_s=3.0).run(make_events(20), 5)
    assert result.warmup["absorbed"] is False
    assert result.errors["warmup_not_absorbed"] == 1
    assert len(result.outcomes) == 15


def test_failed_predictions_count_as_wrong_and_their_labels_are_still_sent() -> None:
    clock = FakeClock()
    events = make_events(30)
    system = FakeSystem(clock, fail_texts={events[20].text})
    result = runner(system, clock).run(events, 3)
    failed = [o for o in result.outcomes if o.error]
    assert {o.event_id for o in failed} >= {"e20"}
    assert all(o.predicted is None and o.latency_s is None for o in failed)
    assert result.errors["predict_http_500"] >= 1
    assert any(e[0] == "feedback" and e[1] == "e20" for e in system.log)
    assert result.error_examples[0]["kind"] == "predict_http_500"


def test_replay_stops_when_the_deployment_stops_answering() -> None:
    clock = FakeClock()
    events = make_events(100)
    system = FakeSystem(clock, fail_texts={e.text for e in events})
    result = runner(system, clock, max_consecutive_errors=5).run(events, 10)
    assert result.aborted and "5 predictions in a row failed" in result.aborted
    assert len(result.outcomes) == 5


def test_rollout_is_detected_and_measured_on_upcoming_events() -> None:
    clock = FakeClock()
    # Texts that never match each other, so answers come from the model, not the memory.
    events = make_events(60)
    events = [
        e.__class__(e.id, e.ts, f"unique{i} text", e.label, e.domain, e.line) for i, e in enumerate(events)
    ]
    system = FakeSystem(clock, version_every=30, new_model_label="b")
    result = runner(system, clock, rollout_probe_size=5, rollout_probe_every=8).run(events, 6)
    assert len(result.rollouts) == 1
    r = result.rollouts[0]
    assert (r.old_version, r.new_version, r.domain) == ("base/d@1", "base/d@2", "d")
    # Old model: majority label "a" on every probe; new model: "b". Truth on probes decides the flips.
    assert r.flips["n"] == 5
    assert r.old_accuracy is not None and r.new_accuracy is not None
    assert r.flips["nfr"] == pytest.approx(r.old_accuracy)  # every old-right probe flips to wrong ...
    assert r.flips["pfr"] == pytest.approx(r.new_accuracy)  # ... and every old-wrong one to right
    # Probes never count as evaluated events.
    assert [o.position for o in result.outcomes] == list(range(54))


def test_background_churn_is_compared_without_a_rollout() -> None:
    clock = FakeClock()
    system = FakeSystem(clock)
    result = runner(system, clock, rollout_probe_size=3, rollout_probe_every=5).run(make_events(40), 4)
    assert result.rollouts == []
    assert result.background_flips["n"] > 0


def test_feedback_to_fix_times_the_memory_path() -> None:
    clock = FakeClock()
    events = make_events(60)
    # A domain-new label, so the first event with it is an error the memory must fix.
    events[30] = events[30].__class__("e30", 30.0, "zebra zoo zigzag zone zest zinc", "z", "d", 31)
    system = FakeSystem(clock, absorb_s=0.3)
    result = runner(system, clock, fix_samples=1, fix_timeout_s=5.0).run(events, 6)
    fixes = [f for f in result.fixes if f.event_id == "e30"]
    assert fixes, result.fixes
    fix = fixes[0]
    assert fix.fixed and fix.pre_label != "z"
    assert fix.seconds is not None and 0.3 <= fix.seconds < 1.5
    assert fix.probe_text != events[30].text


def test_hidden_domain_is_not_sent_with_predictions_but_is_with_feedback() -> None:
    clock = FakeClock()
    system = FakeSystem(clock)
    runner(system, clock, hide_domain=True).run(make_events(20, domains=("x", "y")), 2)
    assert {e[3] for e in system.log if e[0] == "predict"} == {None}
    assert {e[3] for e in system.log if e[0] == "feedback"} == {"x", "y"}


def test_feedback_send_failure_is_recorded() -> None:
    clock = FakeClock()
    system = FakeSystem(clock)

    class Broken(FakeSystem):
        def send(self, event):  # type: ignore[override]
            raise TransportError("feedback_kafka", "broker down")

    sink = Broken(clock)
    r = ReplayRunner(
        system,
        sink,
        RunnerConfig(fix_samples=0, rollout_probe_size=0),
        clock=clock,
        wall=clock,
        sleep=clock.sleep,
        progress=False,
    )
    result = r.run(make_events(10), 2)
    assert result.errors["feedback_kafka"] == 10
    assert all(o.feedback_at is None for o in result.outcomes)


def test_pacer_fixed_rate_and_stream_time() -> None:
    clock = FakeClock()
    pacer = Pacer(rate=10.0, clock=clock, sleep=clock.sleep)
    for ts in range(5):
        pacer.wait(float(ts))
    assert clock.now == pytest.approx(0.4)
    clock = FakeClock()
    pacer = Pacer(time_scale=100.0, clock=clock, sleep=clock.sleep)
    for ts in (1000.0, 1100.0, 1100.0, 1300.0):
        pacer.wait(ts)
    assert clock.now == pytest.approx(3.0)
    with pytest.raises(ValueError, match="not both"):
        Pacer(rate=1.0, time_scale=2.0)
    with pytest.raises(ValueError, match="positive"):
        Pacer(rate=0.0)


def test_pacer_records_lag_when_the_system_is_slower_than_the_rate() -> None:
    clock = FakeClock()
    pacer = Pacer(rate=100.0, clock=clock, sleep=clock.sleep)
    for ts in range(3):
        pacer.wait(float(ts))
        clock.sleep(0.05)  # each request takes 50 ms, the rate asks for 10 ms
    assert pacer.max_lag_s == pytest.approx(0.08)


def test_near_duplicate_is_close_but_different_and_reproducible() -> None:
    import random

    text = "the quick brown fox jumps over the lazy dog today"
    a = near_duplicate(text, random.Random(1))
    assert a != text and len(a.split()) == len(text.split()) - 1
    assert a == near_duplicate(text, random.Random(1))
    assert near_duplicate("short text", random.Random(0)) == "short text !"


def test_fix_sampler_spreads_samples_over_the_stream() -> None:
    sampler = FixSampler(100, 4)
    taken = []
    for pos in range(100):
        if sampler.wants(pos):
            sampler.take(pos)
            taken.append(pos)
    assert taken == [0, 25, 50, 75]
    assert not FixSampler(100, 0).wants(0)


def test_wait_adapter_skips_single_label_warmup_domains() -> None:
    clock = FakeClock()
    system = FakeSystem(clock)
    events = make_events(40)
    # Warm-up domain "solo" has one label only: no adapter can exist for it, so it is not waited on.
    events[1] = dataclasses.replace(events[1], domain="solo")
    events[2] = dataclasses.replace(events[2], domain="solo")
    assert events[1].label == events[2].label
    plain = system.health
    system.health = lambda: {**plain(), "adapters": {"d": "v1"} if clock() >= 5.0 else {}}  # type: ignore[method-assign]
    result = runner(system, clock, wait_adapter_s=100.0).run(events, 10)
    assert result.warmup["adapter_wait_domains"] == ["d"]
    assert 5.0 <= result.warmup["adapter_wait_s"] < 7.0
    assert result.warmup["adapters_after_warmup"] == {"d": "v1"}
