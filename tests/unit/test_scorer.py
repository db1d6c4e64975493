"""The memory's online experts (serving.scorer): prequential calibration, open label set, forgetting."""

from __future__ import annotations

import numpy as np
import pytest

from serving.memory import InProcessMemory
from serving.scorer import FeedbackScorer, ScorerConfig
from streams.redis_store import Deletion, MemoryEntry


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _stream(n: int, dim: int = 16, seed: int = 0, flip_at: int | None = None):
    """Two linearly separable classes; after ``flip_at`` the labels swap (abrupt concept drift)."""
    rng = np.random.default_rng(seed)
    x = _unit(rng.standard_normal((n, dim)))
    y = np.where(x[:, 0] > 0, "a", "b")
    if flip_at is not None:
        y[flip_at:] = np.where(y[flip_at:] == "a", "b", "a")
    return x, y


def _prequential(mem: InProcessMemory, x, y, domain="d", start: int = 0) -> float:
    correct = 0
    for i in range(len(y)):
        sims, labels = mem.search_batch(domain, x[i : i + 1], mem.scorer.cfg.knn_k)
        vocab, probs = mem.score(domain, x[i : i + 1], sims, labels)
        correct += bool(vocab) and vocab[int(probs[0].argmax())] == y[i]
        mem.add([MemoryEntry(f"{domain}-{start + i}", domain, str(y[i]), x[i], float(i), "v")])
    return correct / len(y)


def test_config_is_checked_up_front():
    with pytest.raises(ValueError, match="knn_k"):
        ScorerConfig(knn_k=0)
    with pytest.raises(ValueError, match="share"):
        ScorerConfig(share=1.0)
    assert ScorerConfig().experts == ["knn", "ncm", "olr@0.03", "olr@0.1", "olr@0.5"]


def test_unknown_domain_scores_nothing():
    mem = InProcessMemory(4)
    vocab, probs = mem.score("nobody", _unit(np.ones((2, 4))), np.zeros((2, 0)), [[], []])
    assert vocab == [] and probs.shape == (2, 0)


def test_mixture_learns_a_linear_concept_and_moves_weight_off_knn():
    mem = InProcessMemory(16)
    x, y = _stream(1500)
    acc = _prequential(mem, x, y)
    assert acc > 0.9
    w = mem.scorer.mixture_weights("d")
    assert abs(sum(w.values()) - 1.0) < 1e-9
    assert w["knn"] < 0.1 < max(w.values())  # a linear boundary: NCM and the regressions predict best


def test_mixture_recovers_after_abrupt_drift():
    mem = InProcessMemory(16)
    x, y = _stream(1600, flip_at=800)
    _prequential(mem, x[:800], y[:800])
    late = _prequential(mem, x[800:], y[800:], start=800)
    assert late > 0.7  # the fast regression and the fixed share let the mixture follow the new concept


def test_a_new_label_is_predictable_from_its_first_example():
    mem = InProcessMemory(16)
    x, y = _stream(200)
    _prequential(mem, x, y)
    novel = _unit(np.r_[np.zeros(15), 1.0].astype(np.float32))
    mem.add([MemoryEntry("new", "d", "c", novel, 0.0, "v")])
    sims, labels = mem.search_batch("d", novel[None, :], 20)
    vocab, probs = mem.score("d", novel[None, :], sims, labels)
    assert vocab[int(probs[0].argmax())] == "c"


def test_forgetting_retrains_the_scorer_as_if_the_entries_never_came():
    x, y = _stream(300, seed=1)
    keep = [i for i in range(300) if i % 3]
    full, clean = InProcessMemory(16), InProcessMemory(16)
    full.add([MemoryEntry(f"e{i}", "d", str(y[i]), x[i], 0.0, "v") for i in range(300)])
    full.apply([Deletion(f"e{i}") for i in range(300) if i not in keep])
    clean.scorer.rebuild("d", x[keep], [str(y[i]) for i in keep])
    a, b = full.scorer._domains["d"], clean.scorer._domains["d"]
    np.testing.assert_allclose(a.weight, b.weight)
    np.testing.assert_allclose(a.bias, b.bias)
    assert len(full) == len(keep)


def test_too_many_labels_switch_the_regressions_off_but_keep_knn():
    scorer = FeedbackScorer(4, ScorerConfig(max_classes=3))
    for i in range(5):
        scorer.observe("d", _unit(np.eye(4)[i % 4]), f"l{i}")
    w = scorer.mixture_weights("d")
    assert w["olr@0.1"] == 0.0 and w["knn"] > 0


def test_a_batch_scores_each_row_as_alone_with_padded_and_unlearnt_neighbours():
    """``predict`` over many rows equals each row alone; a ``-inf`` pad and a neighbour label the scorer
    has not learnt add nothing to the kNN expert."""
    mem = InProcessMemory(16)
    x, y = _stream(300, seed=3)
    mem.add([MemoryEntry(f"e{i}", "d", str(y[i]), x[i], float(i), "v") for i in range(len(y))])
    q = _unit(np.random.default_rng(4).standard_normal((6, 16)))
    sims, labels = mem.search_batch("d", q, mem.scorer.cfg.knn_k)
    sims = sims.astype(np.float64)
    sims[2, 5:] = -np.inf
    labels[4][0] = "never-learnt"
    vocab, probs = mem.score("d", q, sims, labels)
    assert np.allclose(np.delete(probs.sum(axis=1), 4), 1.0) and probs[4].sum() < 1.0  # the kNN share lost
    for i in range(len(q)):
        one_vocab, one = mem.score("d", q[i : i + 1], sims[i : i + 1], [labels[i]])
        assert one_vocab == vocab
        np.testing.assert_allclose(one[0], probs[i], atol=1e-12)
    _, cut = mem.score("d", q[2:3], sims[2:3, :5], [labels[2][:5]])
    np.testing.assert_allclose(cut[0], probs[2], atol=1e-12)


def test_cached_linear_experts_follow_every_write():
    """The NCM and regression logits are cached per domain (one product per request): after every write
    (the regressions learn, the mixture moves, the class means change) a prediction equals one computed
    from scratch, with no cache."""
    mem = InProcessMemory(16)
    x, y = _stream(120, seed=5)
    q = _unit(np.random.default_rng(6).standard_normal((3, 16)))
    for i in range(len(y)):
        mem.add([MemoryEntry(f"e{i}", "d", str(y[i]) if i % 7 else f"new{i}", x[i], float(i), "v")])
        if i % 10 == 0:
            mem.apply([Deletion(f"e{i - 5}")] if i >= 5 else [])
        sims, labels = mem.search_batch("d", q, mem.scorer.cfg.knn_k)
        vocab, cached = mem.score("d", q, sims, labels)
        mem.scorer._domains["d"].cached = None
        fresh_vocab, fresh = mem.score("d", q, sims, labels)
        assert vocab == fresh_vocab
        np.testing.assert_array_equal(cached, fresh)


def test_the_cache_follows_the_regressions_when_the_class_means_stay():
    """The same class-means array passed again (nothing else changed in the memory) still sees what the
    regressions learnt since."""
    scorer = FeedbackScorer(16)
    x, y = _stream(60, seed=7)
    means = _unit(np.stack([x[y == "a"].mean(axis=0), x[y == "b"].mean(axis=0)]))
    no_neighbours = np.zeros((1, 0))
    before = None
    for i in range(len(y)):
        scorer.observe("d", x[i], str(y[i]))
        _, probs = scorer.predict("d", x[:1], no_neighbours, [[]], ["a", "b"], means)
        scorer._domains["d"].cached = None
        _, fresh = scorer.predict("d", x[:1], no_neighbours, [[]], ["a", "b"], means)
        np.testing.assert_array_equal(probs, fresh)
        assert before is None or not np.array_equal(probs, before)  # every step moves the regressions
        before = probs


def test_a_write_scores_without_the_cache_as_a_request_does_with_it():
    """Calibration on the write path computes the linear experts without building the cached matrix
    (it would be stale after the write): the same distributions as the cached request path."""
    mem = InProcessMemory(16)
    x, y = _stream(200, seed=8)
    mem.add(
        [MemoryEntry(f"e{i}", "d", str(y[i]) if i % 9 else f"n{i}", x[i], float(i), "v") for i in range(200)]
    )
    q = _unit(np.random.default_rng(9).standard_normal((4, 16)))
    sims, labels = mem.search_batch("d", q, mem.scorer.cfg.knn_k)
    scorer, st = mem.scorer, mem.scorer._domains["d"]
    class_labels, means = mem.class_means("d")
    cached = scorer._experts(st, q, sims, labels, class_labels, means)
    direct = scorer._experts(st, q, sims, labels, class_labels, means, cached=False)
    np.testing.assert_allclose(direct, cached, atol=1e-6)  # float32 class means there, float64 here
    partial = scorer._experts(st, q, sims, labels, class_labels[:1], means[:1], cached=False)
    whole = scorer._experts(st, q, sims, labels, class_labels[:1], means[:1])
    np.testing.assert_allclose(partial, whole, atol=1e-6)
