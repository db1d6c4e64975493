"""A candidate's evaluation embeds each held-out text once per version (``MemoEncoder``), with the same
report as embedding it at every read; on a tiny real BERT."""

from __future__ import annotations

import numpy as np
import pytest

from learners import artifacts, evaluation
from learners.buffer import Example
from learners.evaluation import MemoEncoder, evaluate_candidate
from learners.trainer import TrainConfig, train_adapter
from serving.compensator import CompensationConfig
from streams.redis_store import MemoryEntry

WORDS = {"pos": ["great", "fresh", "lovely", "tasty"], "neg": ["stale", "awful", "broken", "late"]}


def _examples(n: int, start: int = 0) -> list[Example]:
    out = []
    for i in range(start, start + n):
        label = "pos" if i % 2 else "neg"
        words = WORDS[label]
        text = f"the {words[i % 4]} tea number {i} {words[(i + 1) % 4]}"
        out.append(Example(f"e{i}", text, label, float(i)))
    return out


def _artifact(tmp_path, encoder, examples, parent=None):
    cfg = TrainConfig(epochs=1, batch_size=8, max_steps=3, lora_layers=None, max_length=None)
    trained = train_adapter(encoder, [e.text for e in examples], [e.label for e in examples], cfg, parent)
    version = parent.manifest.version if parent else None
    return artifacts.publish_trained(tmp_path, encoder, "d", trained, version)


def test_the_memo_embeds_each_text_once_per_adapter_in_the_callers_order(tiny_encoder):
    memo = MemoEncoder(tiny_encoder)
    texts = ["a b", "c d", "a b", "e"]
    first = memo.encode(texts)
    np.testing.assert_allclose(first, tiny_encoder.encode(texts), atol=1e-6)
    assert memo.computed == 3  # the repeated text once
    again = memo.encode(["e", "a b"])
    assert memo.computed == 3
    np.testing.assert_array_equal(again, first[[3, 0]])
    assert memo.encode([]).shape == (0, tiny_encoder.dim)
    assert memo.dim == tiny_encoder.dim and memo.lock is tiny_encoder.lock  # the rest is the encoder's


def test_an_evaluation_embeds_each_text_once_per_version_with_the_same_report(
    tmp_path, tiny_encoder, monkeypatch
):
    train, hold = _examples(40), _examples(16, start=40)
    parent = _artifact(tmp_path / "p", tiny_encoder, train[:24])
    candidate = _artifact(tmp_path / "c", tiny_encoder, train, parent)
    keys = tiny_encoder.encode([e.text for e in train])
    entries = [MemoryEntry(e.event_id, "d", e.label, keys[i], e.ts, "m") for i, e in enumerate(train)]
    comp = CompensationConfig()

    embedded: list[tuple[str | None, str]] = []
    encode = type(tiny_encoder).encode

    def counted(self, texts, adapter=None):
        embedded.extend((adapter, t) for t in texts)
        return encode(self, texts, adapter=adapter)

    monkeypatch.setattr(type(tiny_encoder), "encode", counted)

    def run():
        embedded.clear()
        report = evaluate_candidate(tiny_encoder, comp, "d", candidate, parent, train, hold, entries)
        return report, list(embedded)

    memo_report, memo_reads = run()
    monkeypatch.setattr(evaluation, "MemoEncoder", lambda encoder, should_stop=None: encoder)
    plain_report, plain_reads = run()

    assert len(memo_reads) == len(set(memo_reads))  # never twice
    versions = {a for a, _ in memo_reads}
    assert len(versions) == 3  # the base (memory keys), the parent and the candidate
    assert len(plain_reads) >= 2 * len(memo_reads), (len(plain_reads), len(memo_reads))
    assert set(memo_reads) == set(plain_reads)
    assert memo_report.keys() == plain_report.keys()
    for key, value in plain_report.items():
        assert memo_report[key] == pytest.approx(value, abs=1e-6), key


def test_the_memo_asks_should_stop_between_chunks(tiny_encoder):
    from learners.trainer import TrainingInterrupted

    asked = []

    def stop_on_third() -> bool:
        asked.append(1)
        return len(asked) >= 3

    memo = MemoEncoder(tiny_encoder, stop_on_third)
    texts = [f"text {i}" for i in range(MemoEncoder.CHUNK * 3)]
    with pytest.raises(TrainingInterrupted, match="during evaluation"):
        memo.encode(texts)
    assert memo.computed == 2 * MemoEncoder.CHUNK  # two chunks embedded, then it stopped
    memo.encode(texts[:5])  # remembered texts need no pass: no question asked
    assert len(asked) == 3
