"""LoRA in the top layers with the frozen layers' outputs computed once, and training-time truncation,
on tiny real BERT and MPNet models (2 layers: the LoRA in the top one, the bottom one cached)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModel

from learners import artifacts, trainer
from learners.trainer import TrainConfig, lora_config, train_adapter, truncated
from serving.encoder import Encoder, default_model_path

TEXTS = [
    "the tea was great and fresh",
    "awful, stale and late",
    "i would buy this again, five stars",
    "broken on arrival; refund please",
    "a short one",
    "nice " * 40,
] * 3
LABELS = ["pos", "neg", "pos", "neg", "pos", "pos"] * 3
CFG = TrainConfig(epochs=1, batch_size=4, max_steps=5, lora_layers=1, max_length=None)  # 20 reads of 18 texts


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "tiny_mpnet_dir"])
def test_the_adapted_layers_on_the_cached_prefix_give_the_whole_models_output(model_dir, request):
    encoder = Encoder(request.getfixturevalue(model_dir), max_length=32)
    base = AutoModel.from_pretrained(encoder.model_path, dtype=torch.float32)
    model = get_peft_model(base, lora_config(base, CFG))
    assert model.peft_config["default"].layers_to_transform == [1]
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # a trained-looking LoRA, so the adapted layer changes the output
            p.data.normal_(0, 0.2)
        assert "lora" not in name or ".layer.1." in name, name
    model.eval()
    texts = TEXTS[:6]
    batch = encoder.tokenize(texts)
    with torch.no_grad():
        whole = encoder.pool(model(**batch).last_hidden_state, batch["attention_mask"])

    ids = {i: row for i, row in enumerate(encoder.token_ids(texts))}
    prefix = trainer._FrozenPrefix.build(model, encoder, len(texts), lambda idx: None, ids, use_bf16=False)
    assert prefix is not None and prefix.first == 1
    prefix.fill(model, [(list(range(6)), batch)])
    assert [len(prefix.rows[i]) for i in range(6)] == [len(ids[i]) for i in range(6)]  # unpadded
    with torch.no_grad(), prefix.adapted_only():
        assert len(model.get_base_model().encoder.layer) == 1
        inputs = prefix.collate([5, 0, 3, 1, 2, 4])  # another order and padding than the fill's batch
        cached = encoder.pool(model(**inputs).last_hidden_state, inputs["attention_mask"])
    # float16 rows: equal to the whole model's output to float16 precision.
    np.testing.assert_allclose(cached.numpy(), whole[[5, 0, 3, 1, 2, 4]].numpy(), atol=3e-3)
    assert np.abs(cached.numpy() - whole[[5, 0, 3, 1, 2, 4]].numpy()).max() > 0  # the LoRA is in the path
    # Outside the context the model is whole again.
    assert len(model.get_base_model().encoder.layer) == 2
    assert not isinstance(model.get_base_model().embeddings, trainer._GivenHidden)


def test_a_top_layer_run_saves_an_adapter_that_serving_loads_and_continues_with_its_layers(
    tmp_path, tiny_encoder, monkeypatch
):
    fills = []
    monkeypatch.setattr(trainer._FrozenPrefix, "fill", _spy(trainer._FrozenPrefix.fill, fills))
    trained = train_adapter(tiny_encoder, TEXTS, LABELS, CFG)
    assert fills and trained.steps == 5 and np.isfinite(trained.final_loss)
    # The returned model is whole, with LoRA weights in the top layer only.
    assert len(trained.model.get_base_model().encoder.layer) == 2
    assert not any(m.training for m in trained.model.modules())  # frozen layers and embeddings included
    assert trained.lora_manifest()["layers"] == [1]
    parent = artifacts.publish_trained(tmp_path, tiny_encoder, "d", trained)
    saved = json.loads((parent.adapter_dir / "adapter_config.json").read_text())
    assert saved["layers_to_transform"] == [1]
    assert trainer.adapter_layers(parent.adapter_dir) == [1]

    # Serving's encoder loads it and its answers follow the trained model's (full window, all layers).
    serving = Encoder(tiny_encoder.model_path, max_length=32)
    serving.add_adapter("v1", parent.adapter_dir)
    batch = serving.tokenize(TEXTS[:4])
    with torch.no_grad():
        want = serving.pool(trained.model(**batch).last_hidden_state, batch["attention_mask"])
    np.testing.assert_allclose(serving.encode(TEXTS[:4], adapter="v1"), want.numpy(), atol=1e-5)

    # A continued run keeps its parent's layers even when the configuration asks for others.
    child = train_adapter(tiny_encoder, TEXTS, LABELS, replace(CFG, lora_layers=2), parent)
    assert child.lora_manifest()["layers"] == [1]


def test_a_parent_with_lora_in_every_layer_is_continued_in_every_layer_without_a_cache(
    tmp_path, tiny_encoder, monkeypatch
):
    old = train_adapter(tiny_encoder, TEXTS, LABELS, replace(CFG, lora_layers=None))
    assert old.lora_manifest()["layers"] is None
    parent = artifacts.publish_trained(tmp_path, tiny_encoder, "d", old)
    fills = []
    monkeypatch.setattr(trainer._FrozenPrefix, "fill", _spy(trainer._FrozenPrefix.fill, fills))
    child = train_adapter(tiny_encoder, TEXTS, LABELS, CFG, parent)
    assert child.lora_manifest()["layers"] == [0, 1] and not fills
    # The parent's weights were the starting point: before any step the child equals the parent.
    zero = train_adapter(tiny_encoder, TEXTS, LABELS, replace(CFG, max_steps=0), parent)
    state = get_peft_model_state_dict(zero.model)
    saved = load_file(str(parent.adapter_dir / "adapter_model.safetensors"))
    assert set(state) == set(saved) and all(torch.equal(state[k], saved[k]) for k in saved)


def test_rows_over_the_byte_budget_train_without_a_cache(tiny_encoder, monkeypatch):
    monkeypatch.setattr(trainer, "FROZEN_CACHE_BYTES", 1000)
    fills = []
    monkeypatch.setattr(trainer._FrozenPrefix, "fill", _spy(trainer._FrozenPrefix.fill, fills))
    trained = train_adapter(tiny_encoder, TEXTS, LABELS, CFG)
    assert not fills and trained.steps == 5 and trained.lora_manifest()["layers"] == [1]


def test_a_run_that_reads_its_texts_less_than_once_computes_no_rows(tiny_encoder, monkeypatch):
    fills = []
    monkeypatch.setattr(trainer._FrozenPrefix, "fill", _spy(trainer._FrozenPrefix.fill, fills))
    trained = train_adapter(tiny_encoder, TEXTS, LABELS, replace(CFG, max_steps=4))  # 16 reads of 18
    assert not fills and trained.steps == 4
    train_adapter(tiny_encoder, TEXTS, LABELS, replace(CFG, max_steps=5))
    assert fills


def test_training_truncation_matches_the_tokenizers_and_keeps_the_closing_token():
    long_text = "word " * 200
    for length in (2, 5, 16, 64):
        want = Encoder(default_model_path(), max_length=length).token_ids([long_text, "tiny"])
        whole = Encoder(default_model_path(), max_length=128).token_ids([long_text, "tiny"])
        got = [truncated(row, length) for row in whole]
        for w, g in zip(want, got, strict=True):
            np.testing.assert_array_equal(w, g)
    with pytest.raises(ValueError, match="at least 2"):
        truncated(np.arange(10), 1)
    row = np.arange(10)
    assert truncated(row, None) is row and truncated(row, 10) is row


def test_a_run_reads_its_texts_cut_to_max_length(tiny_encoder, monkeypatch):
    seen: list[int] = []
    collate = tiny_encoder.collate

    def spy(rows):
        seen.extend(len(r) for r in rows)
        return collate(rows)

    monkeypatch.setattr(tiny_encoder, "collate", spy)
    train_adapter(tiny_encoder, TEXTS, LABELS, replace(CFG, max_length=8))
    assert max(seen) == 8  # the 40-word text is cut (the encoder's own window is 32)


def test_lora_layers_must_be_positive():
    base = AutoModel.from_pretrained(default_model_path())
    with pytest.raises(ValueError, match="at least 1"):
        lora_config(base, TrainConfig(lora_layers=0))
    assert lora_config(base, TrainConfig(lora_layers=3)).layers_to_transform == [3, 4, 5]
    assert lora_config(base, TrainConfig(lora_layers=10)).layers_to_transform == [0, 1, 2, 3, 4, 5]


def _spy(fn, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapped


def test_a_continued_run_embeds_for_its_head_only_the_labels_its_parent_lacks(
    tmp_path, tiny_encoder, monkeypatch
):
    trained = train_adapter(tiny_encoder, TEXTS, LABELS, CFG)
    parent = artifacts.publish_trained(tmp_path, tiny_encoder, "d", trained)
    rows: list[int] = []
    forward = type(tiny_encoder).forward

    def counted(self, batch, adapter=None):
        rows.append(len(batch["input_ids"]))
        return forward(self, batch, adapter)

    monkeypatch.setattr(type(tiny_encoder), "forward", counted)
    child = train_adapter(tiny_encoder, TEXTS, LABELS, CFG, parent)
    assert rows == [] and child.labels == ["neg", "pos"]  # both rows come from the parent
    untrained = train_adapter(tiny_encoder, TEXTS, LABELS, replace(CFG, max_steps=0), parent)
    np.testing.assert_array_equal(untrained.head_weight.numpy(), parent.head.weight)
    child = train_adapter(
        tiny_encoder, [*TEXTS, "meh", "so so"], [*LABELS, "neutral", "neutral"], CFG, parent
    )
    assert sum(rows) == 2 and child.labels == ["neg", "neutral", "pos"]  # the new label's two texts
