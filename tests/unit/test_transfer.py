"""Moving an adapter to another base (Trans-LoRA): synthetic inputs, the discriminator, distillation onto
tiny real models (a same-architecture BERT and an MPNet of another width), and atomic publishing."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel

from learners import artifacts
from learners.buffer import Example
from learners.trainer import TrainConfig, lora_targets, train_adapter
from learners.transfer import (
    TransferConfig,
    calibrated,
    discriminate,
    fit_serving,
    mcnemar_better,
    perturb,
    publish_transfer,
    republish,
    transfer_adapter,
)
from serving.artifacts import load_artifact
from serving.compensator import CompensationConfig
from serving.encoder import Encoder, default_model_path
from serving.errors import ArtifactRejected
from serving.predictor import DEFAULT_MEMORY_WEIGHT
from streams.schemas import ArtifactManifest

TEXTS = [
    "good food and great service",
    "bad food and awful service",
    "lovely taste really great",
    "terrible taste really awful",
    "great value would buy again",
    "awful value never again",
] * 4
LABELS = ["pos", "neg"] * 12
FAST = TransferConfig(synthetic_per_example=2, train=TrainConfig(epochs=2, batch_size=8, max_steps=12))


def _save(model, tmp_path_factory, name: str) -> str:
    out = tmp_path_factory.mktemp(name)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(default_model_path()).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def same_arch_encoder(tmp_path_factory):
    """The tiny BERT's architecture with other weights: a same-architecture base update."""
    torch.manual_seed(1)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    return Encoder(_save(BertModel(cfg), tmp_path_factory, "bert-b"), max_length=32)


@pytest.fixture(scope="module")
def mpnet_encoder(tiny_mpnet_dir):
    """Another architecture and width (MPNet, hidden 48): adapters cannot load across."""
    return Encoder(tiny_mpnet_dir, max_length=32)


@pytest.fixture(scope="module")
def teacher(tiny_encoder, tmp_path_factory):
    root = tmp_path_factory.mktemp("arts")
    trained = train_adapter(tiny_encoder, TEXTS, LABELS, TrainConfig(epochs=3, batch_size=8))
    manifest = ArtifactManifest(
        domain="food",
        version="v1",
        base_fingerprint=tiny_encoder.fingerprint,
        labels=trained.labels,
        files={},
    )
    path = artifacts.publish(root, manifest, trained.write)
    return load_artifact(path, base_fingerprint=tiny_encoder.fingerprint, dim=tiny_encoder.dim)


def _examples() -> list[Example]:
    return [Example(f"e{i}", t, y, float(i)) for i, (t, y) in enumerate(zip(TEXTS, LABELS, strict=True))]


def test_perturb_is_deterministic_and_never_empty():
    cfg = TransferConfig(synthetic_per_example=3, drop_prob=0.9)
    a = perturb(TEXTS[:6], cfg, random.Random(0))
    b = perturb(TEXTS[:6], cfg, random.Random(0))
    assert a == b
    assert len(a) == 18 and all(t.strip() for t in a)
    vocab = {w for t in TEXTS for w in t.split()}
    assert all(set(t.split()) <= vocab for t in a)  # built only from buffered words
    assert a != TEXTS[:6] * 3


def test_discriminator_drops_off_domain_and_unsure_inputs():
    rng = np.random.default_rng(0)
    key = np.ones(8) / np.sqrt(8)
    real = key + 0.05 * rng.standard_normal((20, 8))
    real /= np.linalg.norm(real, axis=1, keepdims=True)
    near, far = real[:2], -real[:2]
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.9, 0.1], [0.9, 0.1]])
    cfg = TransferConfig(key_quantile=0.05, min_confidence=0.6)
    keep = discriminate(real, np.concatenate([near, far]), probs, cfg)
    assert keep.tolist() == [True, False, False, False]


def test_lora_targets_follow_the_architecture(tiny_encoder, mpnet_encoder):
    assert lora_targets(tiny_encoder.base_model, ("query", "value")) == ["query", "value"]
    assert lora_targets(mpnet_encoder.base_model, ("query", "value")) == ["q", "v"]
    with pytest.raises(ValueError, match="no LoRA target"):
        lora_targets(torch.nn.Linear(2, 2), ("query", "value"))


def test_transfer_to_another_architecture_publishes_a_loadable_child(
    tiny_encoder, mpnet_encoder, teacher, tmp_path
):
    with pytest.raises(ArtifactRejected):  # the reason a transfer exists
        load_artifact(teacher.path, base_fingerprint=mpnet_encoder.fingerprint, dim=mpnet_encoder.dim)
    result = transfer_adapter(tiny_encoder, teacher, mpnet_encoder, _examples(), FAST)
    rep = result.report
    assert rep["transfer_real"] == result.n_train == 20 and result.n_holdout == 4
    assert 0 < rep["transfer_synthetic_kept"] <= rep["transfer_synthetic"] == 40
    assert {"teacher_accuracy", "holdout_accuracy", "agreement", "nfr", "pfr"} <= set(rep)
    child = publish_transfer(tmp_path, teacher, result, mpnet_encoder, FAST)
    m = child.manifest
    assert m.parent == "v1" and m.domain == "food"
    assert m.base_fingerprint == mpnet_encoder.fingerprint != teacher.manifest.base_fingerprint
    assert m.lora["target_modules"] == ["q", "v"]
    assert m.data_window["transfer_from"] == tiny_encoder.fingerprint
    assert child.head.weight.shape == (2, 48) and child.head.labels == teacher.head.labels
    assert m.metrics["agreement"] == rep["agreement"]
    assert "memory_weight" not in m.metrics  # no deployment compensation given: nothing fitted
    # Serving's own path loads it on the new base.
    mpnet_encoder.add_adapter("child", child.adapter_dir)
    try:
        assert mpnet_encoder.encode(["good food"], adapter="child").shape == (1, 48)
    finally:
        mpnet_encoder.remove_adapter("child")
    assert not any(p.name.startswith(artifacts.TMP_PREFIX) for p in child.path.parent.iterdir())


def test_publish_transfer_fits_the_students_serving_calibration_on_the_new_base(
    tiny_encoder, mpnet_encoder, teacher, tmp_path
):
    comp = CompensationConfig()
    result = transfer_adapter(tiny_encoder, teacher, mpnet_encoder, _examples(), FAST)
    assert [e.event_id for e in result.hold] == ["e20", "e21", "e22", "e23"]  # the newest, held out
    assert len(result.train) == result.n_train == 20
    child = publish_transfer(tmp_path, teacher, result, mpnet_encoder, FAST, comp=comp)
    m = child.manifest.metrics
    assert 0.0 <= m["memory_weight"] <= 1.0
    assert m["agreement"] == result.report["agreement"]  # the transfer's report is kept beside it
    # Exactly what the fit gives for the committed student (new-base keys of the training part).
    fit = fit_serving(mpnet_encoder, comp, child, result.train, result.hold)
    assert {k: m[k] for k in fit} == fit
    assert not [n for n in mpnet_encoder.adapters if n.startswith("food@")]  # the fit unloads its own


def test_fit_serving_keeps_the_fit_only_when_it_beats_the_defaults(tiny_encoder, teacher):
    comp = CompensationConfig()
    examples = _examples()
    train, hold = examples[:20], examples[20:]
    out = fit_serving(tiny_encoder, comp, teacher, train, hold)
    wins, losses = int(out["calibration_wins"]), int(out["calibration_losses"])
    assert wins + losses <= len(hold)
    if not mcnemar_better(wins, losses):  # four held-out examples never suffice: the defaults
        assert out["memory_weight"] == DEFAULT_MEMORY_WEIGHT and "compensation_sim_low" not in out
    assert fit_serving(tiny_encoder, comp, teacher, train, []) == {}
    assert not [n for n in tiny_encoder.adapters if n.startswith("food@")]


def test_mcnemar_needs_more_wins_than_chance():
    assert mcnemar_better(10, 0) and mcnemar_better(20, 6)
    assert not mcnemar_better(5, 3) and not mcnemar_better(3, 10) and not mcnemar_better(0, 0)
    assert not mcnemar_better(4, 0)  # (4 - 1)^2 / 4 = 2.25 < 3.84


def test_calibrated_replaces_the_serving_values_under_another_version(teacher):
    cal = calibrated(teacher, {"memory_weight": 0.2}, suffix="x")
    assert cal.manifest.metrics["memory_weight"] == 0.2 and "compensation_sim_low" not in cal.manifest.metrics
    assert cal.manifest.version == f"{teacher.manifest.version}-x" and cal.adapter_dir == teacher.adapter_dir
    assert calibrated(cal, {}, suffix="y").manifest.metrics.get("memory_weight") is None


def test_same_architecture_transfer_starts_from_the_teacher(tiny_encoder, same_arch_encoder, teacher):
    """Zero steps on a same-architecture base: the student is the teacher's LoRA and head, unchanged."""
    cfg = TransferConfig(synthetic_per_example=1, train=TrainConfig(epochs=1, max_steps=0))
    result = transfer_adapter(tiny_encoder, teacher, same_arch_encoder, _examples(), cfg)
    assert np.allclose(result.trained.head().weight, teacher.head.weight)
    state = result.trained.model.state_dict()
    lora_a = next(v for k, v in state.items() if "lora_A" in k)
    assert float(lora_a.abs().sum()) > 0


def test_a_top_layer_teacher_moves_to_a_same_architecture_base_with_its_layers(
    tiny_encoder, same_arch_encoder, mpnet_encoder, tmp_path
):
    """The learner's adapters cover the top layers only: a same-architecture student takes the same
    layers and starts from the teacher's weights; republishing carries them as they are; a student of
    another architecture gets LoRA in every one of its layers."""
    trained = train_adapter(tiny_encoder, TEXTS, LABELS, TrainConfig(epochs=1, batch_size=8, lora_layers=1))
    top = artifacts.publish_trained(tmp_path / "a", tiny_encoder, "food", trained)
    cfg = TransferConfig(synthetic_per_example=1, train=TrainConfig(epochs=1, max_steps=0, lora_layers=None))
    result = transfer_adapter(tiny_encoder, top, same_arch_encoder, _examples(), cfg)
    assert result.trained.lora_manifest()["layers"] == [1]
    assert np.allclose(result.trained.head().weight, top.head.weight)  # warm: the teacher's head
    moved = republish(tmp_path / "b", top, same_arch_encoder)
    assert moved.manifest.lora["layers"] == [1]
    other = transfer_adapter(tiny_encoder, top, mpnet_encoder, _examples(), cfg)
    assert other.trained.lora_manifest()["layers"] is None


def test_republish_carries_the_adapter_to_a_same_architecture_base(
    tiny_encoder, same_arch_encoder, mpnet_encoder, teacher, tmp_path
):
    moved = republish(tmp_path, teacher, same_arch_encoder)
    assert moved.manifest.parent == "v1"
    assert moved.manifest.base_fingerprint == same_arch_encoder.fingerprint
    assert (
        moved.manifest.files["adapter/adapter_model.safetensors"]
        == (teacher.manifest.files["adapter/adapter_model.safetensors"])
    )
    with pytest.raises(ValueError, match="head width"):
        republish(tmp_path, teacher, mpnet_encoder)


def test_transfer_refuses_an_empty_buffer(tiny_encoder, mpnet_encoder, teacher):
    with pytest.raises(ValueError, match="no examples"):
        transfer_adapter(tiny_encoder, teacher, mpnet_encoder, [], FAST)


class _FakeRebuilder:
    """Stands in for the Kafka/Redis rebuild; records which base's keys it would write."""

    calls: list = []

    def __init__(self, settings, encoder=None) -> None:
        self.settings, self.encoder = settings, encoder

    def run(self):
        from ops.memory_admin import RebuildReport

        _FakeRebuilder.calls.append((self.settings, self.encoder.fingerprint))
        return RebuildReport(
            generation=1, forgets=0, events=3, added=3, skipped_invalid=0, caught_up=0, seconds=0
        )


class _FakeRegistry:
    def __init__(self, active: dict[str, str]) -> None:
        self._active = active

    def active(self) -> dict[str, str]:
        return dict(self._active)


def test_migrate_base_rekeys_then_transfers_every_promoted_adapter(
    tiny_encoder, tiny_model_dir, mpnet_encoder, teacher, tmp_path, monkeypatch
):
    import json

    from learners.buffer import ReplayBuffers
    from ops import migrate
    from ops.settings import load_settings
    from streams.schemas import FeedbackEvent

    settings = load_settings(state_dir=tmp_path, model_path=tiny_model_dir, runtime="torch")
    root = settings.artifacts_dir / "food"
    root.mkdir(parents=True)
    import shutil

    shutil.copytree(teacher.path, root / "v1")
    buffers = ReplayBuffers(tmp_path / "learner" / "buffers")
    buffers.add(
        [
            FeedbackEvent(event_id=e.event_id, text=e.text, label=e.label, domain="food", ts=e.ts)
            for e in _examples()
        ]
    )
    _FakeRebuilder.calls.clear()
    monkeypatch.setattr(migrate, "Rebuilder", _FakeRebuilder)
    monkeypatch.setattr(migrate, "connect", lambda cfg: None)
    monkeypatch.setattr(
        migrate, "RegistryStore", lambda client, cfg: _FakeRegistry({"food": "v1", "empty": "v9"})
    )

    report = migrate.migrate_base(settings, mpnet_encoder.model_path, cfg=FAST)

    ((rebuild_settings, keyed_with),) = _FakeRebuilder.calls
    assert keyed_with == mpnet_encoder.fingerprint  # the memory is re-keyed with the new base
    assert rebuild_settings.consumer_group_prefix == settings.consumer_group_prefix
    assert report.from_fingerprint == tiny_encoder.fingerprint
    assert report.to_fingerprint == mpnet_encoder.fingerprint
    assert report.skipped == {"empty": "the replay buffer holds no examples"}
    moved = report.adapters["food"]
    assert moved["parent"] == "v1"
    child = load_artifact(
        settings.artifacts_dir / "food" / moved["version"],
        base_fingerprint=mpnet_encoder.fingerprint,
        dim=mpnet_encoder.dim,
    )
    assert child.manifest.parent == "v1"
    # Fitted for the new base on the buffer's holdout, with the deployment's compensation.
    assert 0.0 <= child.manifest.metrics["memory_weight"] <= 1.0
    assert moved["metrics"] == child.manifest.metrics
    plan = json.loads((tmp_path / "migrations" / f"{mpnet_encoder.fingerprint[:12]}.json").read_text())
    assert plan["adapters"]["food"]["version"] == moved["version"] and plan["memory_generation"] == 1
    target = migrate.migration_settings(settings, mpnet_encoder.model_path)
    assert target.consumer_group_prefix == f"driftserve-{mpnet_encoder.fingerprint[:12]}"
    with pytest.raises(ValueError, match="already served"):
        migrate.migrate_base(settings, tiny_model_dir, cfg=FAST)
