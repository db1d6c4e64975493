"""The learner on a tiny real BERT with fakes for Redis: triggers, the training worker, forgets during a
run, and exact unlearning at adapter scope."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from learners import service
from learners.drift import DriftMonitor, PageHinkley
from learners.service import Learner, LearnerPolicy
from learners.trainer import TrainConfig, TrainingInterrupted, train_adapter
from serving.compensator import CompensationConfig
from serving.memory import InProcessMemory
from streams.kafka_io import KafkaConfig
from streams.redis_store import Deletion, MemoryEntry, RedisConfig
from streams.schemas import FeedbackEvent, ForgetEvent
from tests.conftest import wait_for

CFG = TrainConfig(epochs=1, batch_size=8, max_steps=3)


class FakeRegistry:
    def __init__(self) -> None:
        self.active_versions: dict[str, str] = {}
        self.submitted: list[tuple[str, str, dict, bool]] = []
        self.evaluated_against: dict[str, str | None] = {}

    def active(self) -> dict[str, str]:
        return dict(self.active_versions)

    def submit_candidate(
        self,
        domain,
        version,
        *,
        parent,
        metrics,
        actor="learner",
        reason="",
        unlearning=False,
        evaluated_against=None,
    ):
        self.submitted.append((domain, version, metrics, unlearning))
        self.evaluated_against[version] = evaluated_against

    def withdraw(self, domain, *, actor, reason):
        self.active_versions.pop(domain, None)

    def get(self, domain, version):
        return None  # no rollout states here: a submitted candidate never holds the next run back


class FakeMemoryLog:
    def __init__(self, encoder) -> None:
        self.encoder = encoder
        self.entries: dict[str, MemoryEntry] = {}

    def write(self, events: list[FeedbackEvent]) -> None:
        keys = self.encoder.encode([e.text for e in events])
        for e, k in zip(events, keys, strict=True):
            self.entries[e.event_id] = MemoryEntry(e.event_id, e.domain, e.label, k, e.ts, "v")

    def iter_all(self):
        return iter(list(self.entries.values()))


@pytest.fixture()
def learner(tmp_path, tiny_encoder, monkeypatch):
    registry = FakeRegistry()
    log = FakeMemoryLog(tiny_encoder)
    monkeypatch.setattr(service, "connect", lambda cfg: object())
    monkeypatch.setattr(service, "RegistryStore", lambda client, cfg: registry)
    monkeypatch.setattr(service, "MemoryLog", lambda client, cfg, fp: log)
    lrn = Learner(
        tiny_encoder,
        kafka=KafkaConfig(),
        redis_cfg=RedisConfig(),
        artifacts_dir=tmp_path / "artifacts",
        buffer_dir=tmp_path / "buffers",
        train_cfg=CFG,
        policy=LearnerPolicy(min_examples=8, retrain_every=16, holdout_frac=0.25, max_interval_s=None),
        comp=CompensationConfig(),
    )
    return lrn


WORDS = {"pos": ["good", "great", "fine", "lovely"], "neg": ["bad", "awful", "poor", "sad"]}


def _events(n: int, start: int = 0, domain: str = "d") -> list[FeedbackEvent]:
    out = []
    for i in range(start, start + n):
        label = "pos" if i % 2 else "neg"
        text = f"{WORDS[label][i % 4]} thing number {i}"
        out.append(FeedbackEvent(event_id=f"e{i}", text=text, label=label, domain=domain, ts=float(i)))
    return out


def _records(lrn: Learner, events) -> list[SimpleNamespace]:
    recs = []
    for e in events:
        topic = lrn.kafka.forget_topic if isinstance(e, ForgetEvent) else lrn.kafka.feedback_topic
        recs.append(SimpleNamespace(topic=topic, value=e.model_dump_json().encode()))
    return recs


def _feed(lrn: Learner, events: list[FeedbackEvent]) -> None:
    lrn.apply(_records(lrn, events))
    lrn.memory_log.write(events)


# -- drift ----------------------------------------------------------------------------------------------
def test_page_hinkley_alarms_on_an_increase_of_the_error_only():
    ph = PageHinkley(threshold=5.0)
    rng = np.random.default_rng(0)
    assert not any(ph.update(float(rng.random() < 0.1)) for _ in range(500))
    assert any(ph.update(float(rng.random() < 0.6)) for _ in range(100))


def test_drift_monitor_alarms_when_the_concept_flips():
    mon = DriftMonitor()
    stable = [(f"{WORDS[lab][i % 4]} item {i}", lab) for i in range(400) for lab in ("pos", "neg")]
    assert not any(mon.observe(t, lab) for t, lab in stable)
    flipped = [(t, "neg" if lab == "pos" else "pos") for t, lab in stable[:200]]
    assert any(mon.observe(t, lab) for t, lab in flipped)


# -- triggers -------------------------------------------------------------------------------------------
def test_triggers_first_adapter_then_count_drift_and_schedule(learner):
    _feed(learner, _events(4))
    assert learner.trigger("d") is None  # too few examples
    _feed(learner, _events(8, start=4))
    assert learner.trigger("d") == "first adapter"
    learner.registry.active_versions["d"] = "v0"
    learner.buffers.mark_trained("d")
    assert learner.trigger("d") is None
    _feed(learner, _events(16, start=12))
    assert learner.trigger("d") == "new labels"
    learner.buffers.mark_trained("d")
    learner.policy = LearnerPolicy(min_examples=8, retrain_every=64, max_interval_s=None)
    learner._domain("d").drifted = True
    _feed(learner, _events(15, start=28))
    assert learner.trigger("d") is None  # drift waits for min_new_after_drift labels
    _feed(learner, _events(1, start=43))
    assert learner.trigger("d") == "drift"
    learner._domain("d").drifted = False
    learner.policy = LearnerPolicy(min_examples=8, retrain_every=64, max_interval_s=0.0)
    assert learner.trigger("d") == "schedule"


# -- the worker -----------------------------------------------------------------------------------------
def test_training_runs_on_the_worker_while_the_poll_thread_keeps_applying(learner, monkeypatch):
    started, release = threading.Event(), threading.Event()
    real = service.train_adapter

    def slow_train(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "train_adapter", slow_train)
    _feed(learner, _events(24))
    stop = threading.Event()
    worker = threading.Thread(target=learner._work, args=(stop,))
    worker.start()
    try:
        assert learner.schedule() == ["d"]
        assert started.wait(30)
        t0 = time.monotonic()
        _feed(learner, _events(8, start=24))  # the poll loop goes on while the run is in flight
        assert time.monotonic() - t0 < 5 and len(learner.buffers.examples("d")) == 32
        assert learner.schedule() == []  # already queued or training
        release.set()
        wait_for(lambda: learner.registry.submitted, 120, what="a submitted candidate")
    finally:
        release.set()
        stop.set()
        worker.join(30)
    domain, _version, metrics, unlearning = learner.registry.submitted[0]
    assert domain == "d" and not unlearning
    for name in ("holdout_accuracy", "current_accuracy", "nfr", "pfr", "ece", "current_ece", "memory_weight"):
        assert name in metrics
    assert learner.buffers.new_since_train("d") == 8  # arrivals during the run still count


def test_a_forget_during_training_discards_the_candidate(learner, monkeypatch):
    real = service.train_adapter

    def train_then_forget(*args, **kwargs):
        out = real(*args, **kwargs)
        learner.apply(_records(learner, [ForgetEvent(forget_id="f", event_ids=("e3",))]))
        return out

    monkeypatch.setattr(service, "train_adapter", train_then_forget)
    _feed(learner, _events(24))
    report = learner.train_domain("d")
    assert not report.submitted and report.reason == "forget arrived during training"
    assert learner.registry.submitted == [] and "d" in learner.unlearn
    assert not [p for p in (learner.artifacts_dir / "d").iterdir() if not p.name.startswith(".")]


def _published(lrn: Learner, domain: str) -> list[str]:
    """Artifact folders of ``domain`` (staging folders start with a dot)."""
    folder = lrn.artifacts_dir / domain
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) if folder.exists() else []


def test_a_shutdown_interrupts_the_training_run_and_the_domain_stays_due(learner, monkeypatch):
    _feed(learner, _events(24))
    stop = threading.Event()
    learner._stop = stop  # as run() sets it
    asked = []

    def stop_after_two_steps() -> bool:
        asked.append(1)
        if len(asked) > 2:
            stop.set()
        return stop.is_set()

    real = service.train_adapter

    def train(*args, **kwargs):
        assert kwargs["should_stop"] == stop.is_set  # the service hands its shutdown event to the trainer
        return real(*args, **{**kwargs, "should_stop": stop_after_two_steps})

    monkeypatch.setattr(service, "train_adapter", train)
    learner._jobs.put(("d", "test"))
    learner._jobs.put(None)
    learner._work(threading.Event())  # the worker survives the interruption and takes the next job
    assert len(asked) == 3  # asked before each step: stopped before the third of three
    assert learner.registry.submitted == [] and _published(learner, "d") == []
    assert learner.buffers.new_since_train("d") == 24  # not marked trained: due again on the next start
    assert "d" not in learner._attempted


def test_a_run_that_finishes_training_as_the_shutdown_comes_is_not_evaluated(learner, monkeypatch):
    _feed(learner, _events(24))
    learner._stop = stop = threading.Event()
    real = service.train_adapter

    def train_then_stop(*args, **kwargs):
        out = real(*args, **kwargs)
        stop.set()
        return out

    monkeypatch.setattr(service, "train_adapter", train_then_stop)
    with pytest.raises(TrainingInterrupted, match="before evaluation"):
        learner.train_domain("d")
    assert learner.registry.submitted == [] and _published(learner, "d") == []


def test_a_shutdown_during_the_evaluation_ends_the_run_and_leaves_no_staged_artifact(learner, monkeypatch):
    _feed(learner, _events(24))
    learner._stop = stop = threading.Event()
    real = service.evaluate_candidate
    passes = []

    def evaluate(*args, **kwargs):
        assert kwargs["should_stop"] == stop.is_set  # the service hands its shutdown event to the evaluation

        def stop_on_second_pass() -> bool:
            passes.append(1)
            if len(passes) == 2:
                stop.set()
            return stop.is_set()

        return real(*args, **{**kwargs, "should_stop": stop_on_second_pass})

    monkeypatch.setattr(service, "evaluate_candidate", evaluate)
    with pytest.raises(TrainingInterrupted, match="during evaluation"):
        learner.train_domain("d")
    assert len(passes) == 2  # the first embedding pass ran, the second was never started
    assert learner.registry.submitted == [] and _published(learner, "d") == []
    assert not any((learner.artifacts_dir / "d").iterdir())  # the staged candidate was discarded
    assert learner.buffers.new_since_train("d") == 24


# -- unlearning -----------------------------------------------------------------------------------------
def test_unlearning_retrains_exactly_as_if_the_forgotten_data_never_came(learner, tiny_encoder):
    events = _events(32)
    _feed(learner, events)
    first = learner.train_domain("d")
    learner.registry.active_versions["d"] = first.version
    forgotten = ("e5", "e6", "e7")
    learner.apply(_records(learner, [ForgetEvent(forget_id="f1", event_ids=forgotten)]))
    memory = InProcessMemory(tiny_encoder.dim)
    memory.apply([*learner.memory_log.entries.values(), *(Deletion(i) for i in forgotten)])

    # Gone from the replay buffer (and its file), from the serving memory and from its scorer.
    assert not {e.event_id for e in learner.buffers.examples("d")} & set(forgotten)
    assert not any(memory.contains(i) for i in forgotten)
    assert all(i not in (learner.buffers.directory / "d.jsonl").read_text() for i in ('"e5"', '"e6"', '"e7"'))

    assert learner.trigger("d") == "retrained without forgotten data"
    report = learner.train_domain("d")
    assert report.submitted and learner.registry.submitted[-1][3] is True  # flagged as unlearning
    retrained = learner.artifacts_dir / "d" / report.version

    # The reference: an adapter trained from scratch on the remaining data only, same config and seed.
    remaining = sorted((e for e in events if e.event_id not in forgotten), key=lambda e: e.ts)
    n_hold = int(len(remaining) * learner.policy.holdout_frac)
    train = remaining[:-n_hold]
    ref = train_adapter(tiny_encoder, [e.text for e in train], [e.label for e in train], CFG, parent=None)
    got = load_file(str(retrained / "adapter" / "adapter_model.safetensors"))
    want = {k.replace(".default", ""): v for k, v in ref.model.state_dict().items() if "lora_" in k}
    assert got and set(got) == set(want)
    for k, v in got.items():
        torch.testing.assert_close(v, want[k].cpu(), rtol=1e-5, atol=1e-6)
    head = load_file(str(retrained / "head.safetensors"))
    torch.testing.assert_close(head["weight"], ref.head_weight.cpu(), rtol=1e-5, atol=1e-6)


# -- compatibility terms --------------------------------------------------------------------------------
def test_continued_training_with_distillation_and_bct_adds_a_new_class(tmp_path, tiny_encoder):
    from learners import artifacts
    from serving.artifacts import load_artifact
    from streams.schemas import ArtifactManifest

    events = _events(24)
    texts, labels = [e.text for e in events], [e.label for e in events]
    parent_trained = train_adapter(tiny_encoder, texts, labels, CFG)
    manifest = ArtifactManifest(
        domain="d",
        version="v1",
        base_fingerprint=tiny_encoder.fingerprint,
        labels=parent_trained.labels,
        files={},
    )
    parent = load_artifact(
        artifacts.publish(tmp_path, manifest, parent_trained.write),
        base_fingerprint=tiny_encoder.fingerprint,
        dim=tiny_encoder.dim,
    )
    cfg = TrainConfig(epochs=1, batch_size=8, max_steps=3, distill_weight=1.0, bct_weight=0.5)
    child = train_adapter(tiny_encoder, [*texts, "meh thing"], [*labels, "neutral"], cfg, parent=parent)
    assert child.labels == ["neg", "neutral", "pos"]
    assert child.parent_train_accuracy is not None and 0.0 <= child.parent_train_accuracy <= 1.0
    assert np.isfinite(child.final_loss)
    # The parent's rows are the starting point of the known labels; the new label got its own row.
    assert child.head_weight.shape == (3, tiny_encoder.dim)


def test_a_continued_run_ends_at_an_interpolation_point_chosen_on_its_holdout(learner):
    from dataclasses import replace

    learner.train_cfg = replace(learner.train_cfg, interpolation_grid=(0.5, 1.0))
    _feed(learner, _events(32))
    first = learner.train_domain("d")
    assert "interpolation_alpha" not in first.metrics  # no parent: nothing to interpolate toward
    learner.registry.active_versions["d"] = first.version
    _feed(learner, _events(16, start=32))
    second = learner.train_domain("d")
    assert second.submitted
    assert second.metrics["interpolation_alpha"] in learner.train_cfg.interpolation_grid
    # The compensation floor it will be served with was fitted on the same holdout.
    assert 0.6 <= second.metrics["compensation_sim_low"] < 0.95


def test_replay_mix_keeps_every_new_example_and_replays_a_share_of_old_ones():
    from learners.trainer import replay_mix

    old, new = list(range(100)), list(range(100, 110))
    mixed = replay_mix(new, old, 0.5, seed=0)
    assert mixed[-10:] == new and len(mixed) == 20 and set(mixed[:10]) <= set(old)
    assert sorted(replay_mix(new, old[:3], 0.5)) == [*old[:3], *new]  # too few old ones: all of them
    assert replay_mix(new, old, None) == [*old, *new]
    assert replay_mix([], old, 0.5) == old
    with pytest.raises(ValueError, match="replay share"):
        replay_mix(new, old, 1.0)


def test_a_continued_run_ships_guarded_by_its_parent_with_a_fitted_margin(learner):
    from serving.guard import GUARD_MARGIN

    learner.train_cfg = replace(learner.train_cfg, guard=True)  # opt-in: Settings.learner_guard
    _feed(learner, _events(32))
    first = learner.train_domain("d")
    assert GUARD_MARGIN not in first.metrics  # no parent: nothing to guard with
    assert learner.current("d") is None
    learner.registry.active_versions["d"] = first.version
    _feed(learner, _events(16, start=32))
    second = learner.train_domain("d")
    assert second.submitted and second.metrics[GUARD_MARGIN] >= 0.0
    learner.registry.active_versions["d"] = second.version
    served = learner.current("d")
    assert served is not None and served.guard is not None
    assert served.guard.manifest.version == first.version and served.guard.guard is None
    assert served.manifest.metrics[GUARD_MARGIN] == second.metrics[GUARD_MARGIN]


def test_a_run_outlived_by_its_parent_is_evaluated_again_against_what_is_served(learner, monkeypatch):
    """The previous candidate's rollout ended while this run trained: its evaluation is redone against
    the version served now (the gate's baseline), and the registry is told which one that was."""
    from serving import metrics as serving_metrics

    _feed(learner, _events(32))
    first = learner.train_domain("d")
    learner.registry.active_versions["d"] = first.version
    _feed(learner, _events(16, start=32))
    second = learner.train_domain("d")  # from `first`, not promoted yet
    assert learner.registry.evaluated_against[second.version] is None  # its parent: nothing changed
    _feed(learner, _events(16, start=48))
    original = learner.evaluate
    calls = []

    def evaluate(domain, candidate, parent, train, hold):
        calls.append(parent.manifest.version)
        if len(calls) == 1:  # while the run trained, `second` passed its rollout
            learner.registry.active_versions["d"] = second.version
        scores = original(domain, candidate, parent, train, hold)
        return {**scores, "evaluation": float(len(calls))}

    monkeypatch.setattr(learner, "evaluate", evaluate)
    before = serving_metrics.LEARNER_REEVALUATIONS._value.get()
    third = learner.train_domain("d")
    assert third.submitted and calls == [first.version, second.version]
    assert third.metrics["evaluation"] == 2.0  # the figures the gate sees are the second evaluation's
    assert learner.registry.evaluated_against[third.version] == second.version
    assert serving_metrics.LEARNER_REEVALUATIONS._value.get() == before + 1
    manifest = json.loads((learner.artifacts_dir / "d" / third.version / "manifest.json").read_text())
    assert manifest["parent"] == first.version  # the lineage is what it was trained from


class _Record:
    def __init__(self, state: str) -> None:
        self.state = state


def test_the_next_run_waits_for_the_last_candidates_rollout_within_a_bound(learner, monkeypatch):
    _feed(learner, _events(24))
    first = learner.train_domain("d")
    assert first.submitted
    states = {first.version: "candidate"}
    learner.registry.get = lambda domain, version: _Record(states[version]) if version in states else None
    _feed(learner, _events(16, start=24))  # retrain_every (16) new labels
    for state in ("candidate", "shadow", "canary"):
        states[first.version] = state
        assert learner.trigger("d") is None  # waits for the controller's decision
    states[first.version] = "promoted"
    assert learner.trigger("d") == "new labels"
    # A rollout that outlasts the bound stops holding the learner back.
    learner.train_domain("d")
    second = learner._domain("d").pending[0]
    states[second] = "canary"
    _feed(learner, _events(16, start=40))
    assert learner.trigger("d") is None
    version, since = learner._domain("d").pending
    learner._domain("d").pending = (version, since - learner.policy.max_rollout_wait_s)
    assert learner.trigger("d") == "new labels"
    # A forget never waits.
    learner.train_domain("d")
    states[learner._domain("d").pending[0]] = "shadow"
    learner.registry.active_versions["d"] = first.version
    learner.apply(_records(learner, [ForgetEvent(forget_id="f", event_ids=("e3",))]))
    assert learner.trigger("d") == "retrained without forgotten data"
