"""Compatible prediction updates (serving.guard): the rule, the artifact that carries its parent, the
Predictor serving it, and the learner's margin choice. Tiny real BERT, no mocks of transformers."""

from __future__ import annotations

import dataclasses
import shutil

import numpy as np
import pytest
import torch

from learners import artifacts
from learners.evaluation import choose_guard_margin
from learners.trainer import TrainConfig, distill_weights, train_adapter
from serving.artifacts import GUARD_DIR, HEAD_FILE, load_artifact
from serving.compensator import CompensationConfig
from serving.errors import ArtifactRejected
from serving.guard import GUARD_MARGIN, guard_margin, keeps_parent
from serving.memory import InProcessMemory
from serving.predictor import Prediction, Predictor, adapter_name
from streams.schemas import ArtifactManifest

TEXTS = ["good thing", "bad thing", "great stuff", "awful stuff"] * 2
LABELS = ["pos", "neg", "pos", "neg"] * 2
PROBE = ["good thing", "awful stuff", "a thing", "stuff", "neutral words here", "bad"]


def _publish(tmp_path, encoder, version, *, seed=0, parent=None, guard=None):
    cfg = TrainConfig(epochs=1, batch_size=4, seed=seed, lr=5e-2, head_lr=5e-2)
    trained = train_adapter(encoder, TEXTS, LABELS, cfg, parent=parent)
    manifest = ArtifactManifest(
        domain="d", version=version, base_fingerprint=encoder.fingerprint, labels=trained.labels, files={}
    )
    write = trained.write if guard is None else artifacts.with_guard(trained.write, guard)
    path = artifacts.publish(tmp_path, manifest, write)
    return load_artifact(path, base_fingerprint=encoder.fingerprint, dim=encoder.dim)


def _with_margin(artifact, margin):
    metrics = {**artifact.manifest.metrics, GUARD_MARGIN: margin}
    return dataclasses.replace(artifact, manifest=artifact.manifest.model_copy(update={"metrics": metrics}))


def test_the_parent_stands_only_where_the_candidate_is_not_sure():
    scores = {"a": 0.6, "b": 0.4}
    assert not keeps_parent(scores, "a", "a", 0.5)  # agreement: nothing to guard
    assert not keeps_parent(scores, "a", None, 0.5)  # the parent had no answer
    assert keeps_parent(scores, "a", "b", 0.2)  # 0.6 - 0.4 is not more than 0.2
    assert not keeps_parent(scores, "a", "b", 0.1)
    assert keeps_parent({}, None, "b", 0.0)
    assert not keeps_parent({"a": 1.0}, "a", "c", 0.9)  # a label the candidate gives no mass


def test_a_guarded_artifact_carries_its_parent_verified_and_never_a_chain(tmp_path, tiny_encoder):
    v1 = _publish(tmp_path, tiny_encoder, "v1")
    assert v1.guard is None and guard_margin(v1) is None
    v2 = _publish(tmp_path, tiny_encoder, "v2", seed=1, parent=v1, guard=v1)
    assert v2.guard is not None and v2.guard.manifest.version == "v1"
    assert adapter_name(v2.guard) == adapter_name(v1)  # the encoder shares the parent's loaded adapter
    np.testing.assert_array_equal(v2.guard.head.weight, v1.head.weight)
    assert guard_margin(v2) is None and guard_margin(_with_margin(v2, 0.2)) == 0.2
    v3 = _publish(tmp_path, tiny_encoder, "v3", seed=2, parent=v2, guard=v2)
    assert v3.guard is not None and v3.guard.manifest.version == "v2" and v3.guard.guard is None
    # The guard's files are hashed like the rest: a changed byte rejects the whole artifact.
    tampered = tmp_path / "tampered"
    shutil.copytree(v2.path, tampered)
    (tampered / GUARD_DIR / HEAD_FILE).write_bytes(b"x" + (tampered / GUARD_DIR / HEAD_FILE).read_bytes())
    with pytest.raises(ArtifactRejected):
        load_artifact(tampered, base_fingerprint=tiny_encoder.fingerprint, dim=tiny_encoder.dim)
    # A hand-made guard inside a guard is refused.
    nested = tmp_path / "nested"
    shutil.copytree(v3.path, nested)
    shutil.copytree(v2.path / GUARD_DIR, nested / GUARD_DIR / GUARD_DIR)
    with pytest.raises(ArtifactRejected):
        load_artifact(nested, base_fingerprint=tiny_encoder.fingerprint, dim=tiny_encoder.dim)


def test_the_predictor_serves_the_guarded_answers_and_loads_both_adapters(tmp_path, tiny_encoder):
    before = set(tiny_encoder.adapters)  # the encoder is shared by the session's tests
    predictor = Predictor(tiny_encoder, InProcessMemory(tiny_encoder.dim), CompensationConfig(enabled=False))
    v1 = _publish(tmp_path, tiny_encoder, "v1")
    v2 = _publish(tmp_path, tiny_encoder, "v2", seed=1, parent=v1, guard=v1)
    domains = ["d"] * len(PROBE)

    def answers(artifact):
        predictor.activate(artifact)
        return predictor.predict(PROBE, domains)

    old = answers(v1)
    new = answers(dataclasses.replace(v2, guard=None))
    assert predictor.loaded_adapters() == [adapter_name(v2)]
    # Margin 1: the candidate is never sure enough, the parent's answers are served under the new version.
    held = answers(_with_margin(v2, 1.0))
    assert sorted(predictor.loaded_adapters()) == sorted({adapter_name(v1), adapter_name(v2)})
    assert [p.label for p in held] == [p.label for p in old]
    for h, n, o in zip(held, new, old, strict=True):  # agreement serves the candidate's own distribution
        assert h.scores == (n.scores if n.label == o.label else o.scores)
    assert any(n.label != o.label for n, o in zip(new, old, strict=True))  # the probe tests something
    assert all(p.adapter == "v2" for p in held)
    # A margin below -1 never keeps the parent: the candidate's own answers.
    free = answers(_with_margin(v2, -1.5))
    assert [p.scores for p in free] == [p.scores for p in new]
    # In between, each answer follows the rule.
    mid = answers(_with_margin(v2, 0.0))
    for m, n, o in zip(mid, new, old, strict=True):
        assert m.label == (o.label if keeps_parent(n.scores, n.label, o.label, 0.0) else n.label)
    predictor.deactivate("d")
    assert set(tiny_encoder.adapters) == before  # both of this test's adapters unloaded


def _pred(label, scores):
    return Prediction(
        domain="d", label=label, scores=scores, model_version="v", adapter="v", compensated=False, blend=0.0
    )


def test_the_margin_is_the_one_that_trades_flips_best_on_the_holdout():
    # Row 0: a sure fix; row 1: an unsure break; row 2: a fairly sure fix; row 3: agreement.
    new = [
        _pred("a", {"a": 0.9, "b": 0.1}),
        _pred("a", {"a": 0.55, "b": 0.45}),
        _pred("b", {"b": 0.6, "a": 0.4}),
        _pred("a", {"a": 0.7, "b": 0.3}),
    ]
    old = ["b", "b", "a", "a"]
    truth = ["a", "b", "b", "a"]
    margin, table = choose_guard_margin(new, old, truth, grid=(0.0, 0.15, 0.5, 0.9))
    assert table[0.0] == {"accuracy": 0.75, "nfr": 0.25, "pfr": 0.5}
    assert table[0.15] == {"accuracy": 1.0, "nfr": 0.0, "pfr": 0.5}  # only the unsure break is undone
    assert table[0.5] == {"accuracy": 0.75, "nfr": 0.0, "pfr": 0.25}
    assert table[0.9] == {"accuracy": 0.5, "nfr": 0.0, "pfr": 0.0}
    assert margin == 0.15


def test_distillation_weights_per_mask():
    old_right = torch.tensor([True, True, False, False])
    new_wrong = torch.tensor([True, False, True, False])
    assert distill_weights("old_right", old_right, new_wrong).tolist() == [1, 1, 0, 0]
    assert distill_weights("flips", old_right, new_wrong).tolist() == [1, 0, 0, 0]
    focal = distill_weights("focal", old_right, new_wrong, 0.25).tolist()
    assert focal == [1.25, 1.25, 0.25, 0.25]
    with pytest.raises(ValueError):
        distill_weights("nope", old_right, new_wrong)
