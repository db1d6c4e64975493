from __future__ import annotations

import numpy as np
import pytest

from serving.compensator import CompensationConfig, blend_weight, compensate, neighbour_label_distribution

CFG = CompensationConfig(k=8, tau=0.1, lambda_max=0.9, sim_low=0.6, sim_high=0.95)


def test_blend_weight_grows_with_similarity():
    assert blend_weight(0.5, CFG) == 0.0
    assert blend_weight(0.6, CFG) == 0.0
    assert blend_weight(0.95, CFG) == pytest.approx(0.9)
    assert blend_weight(1.0, CFG) == pytest.approx(0.9)
    assert 0.0 < blend_weight(0.8, CFG) < 0.9


def test_neighbour_distribution_is_softmax_weighted():
    dist = neighbour_label_distribution(np.array([1.0, 0.9]), ["a", "b"], tau=0.1)
    assert dist["a"] == pytest.approx(np.e / (np.e + 1.0))
    assert sum(dist.values()) == pytest.approx(1.0)


def test_exact_duplicate_feedback_corrects_the_prediction():
    probs = {"a": 0.95, "b": 0.05}
    out, lam = compensate(probs, np.array([1.0, 0.7]), ["b", "a"], CFG)
    assert lam == pytest.approx(0.9)
    assert max(out, key=out.get) == "b"
    assert sum(out.values()) == pytest.approx(1.0)


def test_far_neighbours_leave_the_prediction_alone():
    probs = {"a": 0.6, "b": 0.4}
    out, lam = compensate(probs, np.array([0.3]), ["b"], CFG)
    assert lam == 0.0 and out == probs


def test_new_label_from_memory_enters_the_distribution():
    out, _ = compensate({"a": 1.0}, np.array([0.99]), ["brand_new"], CFG)
    assert max(out, key=out.get) == "brand_new"


def test_disabled_or_empty_memory_is_identity():
    probs = {"a": 0.7, "b": 0.3}
    assert compensate(probs, np.zeros(0), [], CFG) == (probs, 0.0)
    off = CompensationConfig(enabled=False)
    assert compensate(probs, np.array([1.0]), ["b"], off) == (probs, 0.0)


@pytest.mark.parametrize(
    "kwargs", [{"lambda_max": 1.5}, {"sim_low": 0.9, "sim_high": 0.5}, {"tau": 0.0}, {"k": 0}]
)
def test_config_is_checked_up_front(kwargs):
    with pytest.raises(ValueError):
        CompensationConfig(**kwargs)


def test_batch_compensation_matches_the_row_wise_rule():
    from serving.compensator import compensate_batch

    rng = np.random.default_rng(1)
    vocab = ["a", "b", "c", "d"]
    for _ in range(50):
        k = int(rng.integers(1, 6))
        probs = rng.dirichlet(np.ones(3))
        sims = np.sort(rng.uniform(0.4, 1.0, size=k))[::-1]
        labels = [vocab[i] for i in rng.integers(0, 4, size=k)]
        expected, lam = compensate(dict(zip(vocab[:3], probs, strict=True)), sims, labels, CFG)
        got, lams = compensate_batch(
            np.pad(probs, (0, 1))[None, :], sims[None, :], np.array([[vocab.index(x) for x in labels]]), CFG
        )
        assert lams[0] == pytest.approx(lam)
        for j, name in enumerate(vocab):
            assert got[0, j] == pytest.approx(expected.get(name, 0.0), abs=1e-9)


def test_a_batch_of_rows_with_padded_neighbours_matches_each_row_alone():
    """Rows are independent: a batch equals its rows compensated one by one, a ``-inf`` pad counts as no
    neighbour, and a row with no neighbour at all is left untouched."""
    from serving.compensator import compensate_batch

    rng = np.random.default_rng(2)
    vocab = ["a", "b", "c", "d", "e"]
    n, k = 7, 4
    probs = rng.dirichlet(np.ones(len(vocab)), size=n)
    probs[3] = 0.0  # no model opinion yet
    sims = np.sort(rng.uniform(0.5, 1.0, size=(n, k)), axis=1)[:, ::-1].copy()
    label_idx = rng.integers(0, len(vocab), size=(n, k))
    sims[1, 2:] = -np.inf  # two neighbours only
    sims[5, :] = -np.inf  # none
    got, lams = compensate_batch(probs, sims, label_idx, CFG)
    for i in range(n):
        real = np.isfinite(sims[i])
        expected, lam = compensate(
            {name: p for name, p in zip(vocab, probs[i], strict=True) if p > 0},
            sims[i][real],
            [vocab[j] for j in label_idx[i][real]],
            CFG,
        )
        assert lams[i] == pytest.approx(lam)
        for j, name in enumerate(vocab):
            assert got[i, j] == pytest.approx(expected.get(name, 0.0), abs=1e-9)
    assert lams[5] == 0.0 and np.allclose(got[5], probs[5])
