"""Baselines on synthetic embeddings: each one's defining behaviour, and that all of them are
prequential (a label is learned only after its event was predicted)."""

from __future__ import annotations

import numpy as np
import pytest

from ops.replay.baselines import (
    KNearest,
    NearestClassMean,
    PeriodicRetrain,
    fit_softmax,
    run_baselines,
)


def clusters(n: int, labels: list[str], seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centers = {lab: rng.normal(size=16) for lab in labels}
    ys = [labels[i % len(labels)] for i in range(n)]
    x = np.stack([centers[y] + 0.3 * rng.normal(size=16) for y in ys]).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), ys


def test_softmax_regression_separates_clusters() -> None:
    x, y = clusters(200, ["a", "b", "c"])
    predict = fit_softmax(x, y, c=10.0)
    assert np.mean([predict(v) == t for v, t in zip(x, y, strict=True)]) > 0.95
    assert fit_softmax(x[:3], ["a"] * 3)(x[0]) == "a"


def test_class_incremental_stream_static_cannot_adapt_but_online_ones_do() -> None:
    x_a, y_a = clusters(60, ["a"], seed=1)
    x_ab, y_ab = clusters(200, ["a", "b"], seed=1)
    x = np.concatenate([x_a, x_ab])
    y = y_a + y_ab
    preds = run_baselines(x, y, ["d"] * len(y), n_warmup=60, retrains=4, k=5)
    truth = y[60:]
    acc = {name: np.mean([p == t for p, t in zip(p_, truth, strict=True)]) for name, p_ in preds.items()}
    assert set(preds) == {"static", "retrain", "ncm", "knn"}
    assert all(len(p) == len(truth) for p in preds.values())
    assert set(preds["static"]) == {"a"}  # trained on the warm-up only: never learns "b"
    assert acc["static"] == pytest.approx(0.5)
    assert acc["ncm"] > 0.9 and acc["knn"] > 0.9 and acc["retrain"] > 0.6


def test_first_event_of_a_new_label_is_never_predicted_right() -> None:
    """Prequential: a label nobody has revealed yet cannot be predicted, by any baseline."""
    x, y = clusters(40, ["a", "b"])
    y = [*y[:-1], "new"]
    preds = run_baselines(x, y, [None] * len(y), n_warmup=10)
    assert all(p[-1] != "new" for p in preds.values())


def test_baselines_are_kept_per_domain() -> None:
    x, _ = clusters(40, ["a"])
    y = ["a" if i % 2 else "b" for i in range(40)]
    domains = ["even" if i % 2 == 0 else "odd" for i in range(40)]
    preds = run_baselines(x, y, domains, n_warmup=10, names=["static"])
    # Each domain has a single label, so a per-domain static model is always right.
    assert all(p == t for p, t in zip(preds["static"], y[10:], strict=True))
    with pytest.raises(ValueError, match="unknown baseline"):
        run_baselines(x, y, domains, n_warmup=10, names=["magic"])


def test_knn_majority_vote_and_ties() -> None:
    knn = KNearest(2, k=3)
    assert knn.predict_one(np.array([1.0, 0.0], dtype=np.float32)) is None
    for v, lab in [([1, 0], "a"), ([0.9, 0.1], "a"), ([0, 1], "b")]:
        knn.learn_one(np.array(v, dtype=np.float32), lab)
    assert knn.predict_one(np.array([0.0, 1.0], dtype=np.float32)) == "a"  # 2 votes beat 1
    assert KNearest(2, k=1).predict_one(np.zeros(2, dtype=np.float32)) is None


def test_ncm_and_periodic_retrain_update_online() -> None:
    ncm = NearestClassMean(2)
    ncm.learn_one(np.array([1.0, 0.0]), "a")
    ncm.learn_one(np.array([0.0, 1.0]), "b")
    assert ncm.predict_one(np.array([0.2, 0.9])) == "b"
    retrain = PeriodicRetrain(2, every=2)
    retrain.learn_one(np.array([1.0, 0.0]), "a")
    assert retrain.predict_one(np.array([0.0, 1.0])) == "a"
    retrain.learn_one(np.array([0.0, 1.0]), "b")
    assert retrain.predict_one(np.array([0.0, 1.0])) == "a"  # one new label: not refitted yet
    retrain.learn_one(np.array([0.0, 1.0]), "b")
    assert retrain.predict_one(np.array([0.0, 1.0])) == "b"
