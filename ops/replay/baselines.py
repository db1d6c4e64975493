"""Baselines on the same frozen encoder embeddings, replayed prequentially in the same run.

They answer "what would a simple model on the same features have done", so driftserve's numbers mean
something. Each baseline has river's verbs (``learn_one``, ``predict_one``) and sees exactly what the
system saw: the warm-up, then each label only after predicting its event. One model per domain, as
driftserve keeps one adapter per domain; one global model when the replay hides the domain.

* ``static``: softmax regression fitted on the warm-up only (what a model that is never updated does).
* ``retrain``: the same model refitted on all revealed data at ``retrains`` evenly spaced points.
* ``ncm``: online nearest class mean.
* ``knn``: k nearest revealed events (cosine), majority vote, ties broken by summed similarity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch


class Baseline(Protocol):
    def learn_one(self, x: np.ndarray, y: str) -> None: ...

    def predict_one(self, x: np.ndarray) -> str | None: ...


class _Growing:
    """Revealed embeddings and labels in a preallocated, doubling matrix (no copies per event)."""

    def __init__(self, dim: int) -> None:
        self.x = np.zeros((256, dim), dtype=np.float32)
        self.y: list[str] = []

    def append(self, x: np.ndarray, y: str) -> None:
        n = len(self.y)
        if n == self.x.shape[0]:
            grown = np.zeros((n * 2, self.x.shape[1]), dtype=np.float32)
            grown[:n] = self.x
            self.x = grown
        self.x[n] = x
        self.y.append(y)

    @property
    def matrix(self) -> np.ndarray:
        return self.x[: len(self.y)]


def fit_softmax(x: np.ndarray, y: Sequence[str], c: float = 1.0, max_iter: int = 200) -> Callable:
    """Multinomial logistic regression with scikit-learn's default objective
    (C * sum CE + 0.5 * ||W||^2, intercept unpenalised), solved by L-BFGS in float64.
    Returns a function embedding -> label."""
    labels = sorted(set(y))
    if len(labels) == 1:
        only = labels[0]
        return lambda _x: only
    index = {lab: i for i, lab in enumerate(labels)}
    xt = torch.from_numpy(np.asarray(x, dtype=np.float64))
    yt = torch.tensor([index[v] for v in y])
    w = torch.zeros(xt.shape[1], len(labels), dtype=torch.float64, requires_grad=True)
    b = torch.zeros(len(labels), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-6)
    n = xt.shape[0]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt, reduction="sum") / n
        loss = loss + (w * w).sum() / (2 * c * n)
        loss.backward()
        return loss

    opt.step(closure)
    weights, bias = w.detach().numpy(), b.detach().numpy()
    return lambda v: labels[int(np.argmax(v.astype(np.float64) @ weights + bias))]


class StaticModel:
    """Fitted once, on the warm-up; later labels are ignored."""

    def __init__(self, dim: int) -> None:
        self._data = _Growing(dim)
        self._model: Callable | None = None
        self.frozen = False

    def learn_one(self, x: np.ndarray, y: str) -> None:
        if not self.frozen:
            self._data.append(x, y)
            self._model = None

    def freeze(self) -> None:
        self.frozen = True

    def predict_one(self, x: np.ndarray) -> str | None:
        if self._model is None:
            if not self._data.y:
                return None
            self._model = fit_softmax(self._data.matrix, self._data.y)
        return self._model(x)


class PeriodicRetrain:
    """Refitted on everything revealed so far whenever ``every`` new labels have arrived."""

    def __init__(self, dim: int, every: int) -> None:
        self.every = max(1, every)
        self._data = _Growing(dim)
        self._model: Callable | None = None
        self._since = 0

    def learn_one(self, x: np.ndarray, y: str) -> None:
        self._data.append(x, y)
        self._since += 1

    def refit_due(self) -> bool:
        return self._model is None or self._since >= self.every

    def predict_one(self, x: np.ndarray) -> str | None:
        if self.refit_due():
            if not self._data.y:
                return None
            self._model = fit_softmax(self._data.matrix, self._data.y)
            self._since = 0
        assert self._model is not None
        return self._model(x)


class NearestClassMean:
    """Euclidean distance to running class means (argmax 2 x.m - |m|^2)."""

    def __init__(self, dim: int) -> None:
        self.labels: list[str] = []
        self.sums = np.zeros((0, dim), dtype=np.float64)
        self.counts = np.zeros(0, dtype=np.float64)

    def learn_one(self, x: np.ndarray, y: str) -> None:
        if y not in self.labels:
            self.labels.append(y)
            self.sums = np.vstack([self.sums, np.zeros((1, self.sums.shape[1]))])
            self.counts = np.append(self.counts, 0.0)
        i = self.labels.index(y)
        self.sums[i] += x
        self.counts[i] += 1

    def predict_one(self, x: np.ndarray) -> str | None:
        if not self.labels:
            return None
        means = self.sums / self.counts[:, None]
        score = 2 * means @ x - (means * means).sum(axis=1)
        return self.labels[int(np.argmax(score))]


class KNearest:
    def __init__(self, dim: int, k: int = 10) -> None:
        self.k = k
        self._data = _Growing(dim)

    def learn_one(self, x: np.ndarray, y: str) -> None:
        self._data.append(x, y)

    def predict_one(self, x: np.ndarray) -> str | None:
        n = len(self._data.y)
        if n == 0:
            return None
        sims = self._data.matrix @ x
        k = min(self.k, n)
        top = np.argpartition(-sims, k - 1)[:k] if k < n else np.arange(n)
        votes: dict[str, list[float]] = {}
        for i in top:
            entry = votes.setdefault(self._data.y[i], [0.0, 0.0])
            entry[0] += 1
            entry[1] += float(sims[i])
        return max(votes, key=lambda lab: (votes[lab][0], votes[lab][1]))


BASELINES: dict[str, str] = {
    "static": "softmax regression on the warm-up only",
    "retrain": "softmax regression refitted on all revealed data {retrains} times",
    "ncm": "online nearest class mean",
    "knn": "kNN over all revealed events (k={k})",
}


def _factory(name: str, dim: int, retrain_every: int, k: int) -> Callable[[], Baseline]:
    if name == "static":
        return lambda: StaticModel(dim)
    if name == "retrain":
        return lambda: PeriodicRetrain(dim, retrain_every)
    if name == "ncm":
        return lambda: NearestClassMean(dim)
    if name == "knn":
        return lambda: KNearest(dim, k)
    raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")


def run_baselines(
    embeddings: np.ndarray,
    labels: Sequence[str],
    domains: Sequence[str | None],
    n_warmup: int,
    *,
    retrains: int = 10,
    k: int = 10,
    names: Sequence[str] = tuple(BASELINES),
) -> dict[str, list[str | None]]:
    """Prequential predictions of each baseline for events ``n_warmup..``: predict, then learn."""
    n = len(labels)
    if embeddings.shape[0] != n or len(domains) != n:
        raise ValueError("embeddings, labels and domains must have the same length")
    dim = embeddings.shape[1]
    retrain_every = max(1, math.ceil((n - n_warmup) / max(1, retrains)))
    out: dict[str, list[str | None]] = {}
    for name in names:
        make = _factory(name, dim, retrain_every, k)
        models: dict[str | None, Baseline] = {}
        for i in range(n_warmup):
            models.setdefault(domains[i], make()).learn_one(embeddings[i], labels[i])
        for m in models.values():
            if isinstance(m, StaticModel):
                m.freeze()
        preds: list[str | None] = []
        for i in range(n_warmup, n):
            model = models.get(domains[i])
            if model is None:
                model = models[domains[i]] = make()
                if isinstance(model, StaticModel):
                    model.freeze()  # a domain absent from the warm-up has no static model
            preds.append(model.predict_one(embeddings[i]))
            model.learn_one(embeddings[i], labels[i])
        out[name] = preds
    return out
