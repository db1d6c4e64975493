"""ReLoop2 serving-time compensation: blend the model's probabilities with the labels of the nearest
stored feedback.

    a_i = softmax(s_i / tau)            over the top-K neighbours (cosine similarity s_i)
    y_bar = sum_i a_i * onehot(y_i)
    p' = (1 - lambda) * p + lambda * y_bar

A fixed lambda is wrong when neighbours are far or few, so lambda grows with the top neighbour's
similarity: 0 below ``sim_low``, ``lambda_max`` at or above ``sim_high``, linear between.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CompensationConfig:
    enabled: bool = True
    k: int = 32
    tau: float = 0.1
    lambda_max: float = 0.9
    sim_low: float = 0.6
    sim_high: float = 0.95
    prototype_tau: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 <= self.lambda_max <= 1.0:
            raise ValueError(f"lambda_max must be in [0, 1], got {self.lambda_max}")
        if not self.sim_low < self.sim_high:
            raise ValueError("sim_low must be below sim_high")
        if self.tau <= 0 or self.prototype_tau <= 0:
            raise ValueError("temperatures must be positive")
        if self.k < 1:
            raise ValueError("k must be at least 1")


def softmax(x: np.ndarray, tau: float) -> np.ndarray:
    z = (x - x.max()) / tau
    e = np.exp(z)
    return e / e.sum()


def neighbour_label_distribution(sims: np.ndarray, labels: list[str], tau: float) -> dict[str, float]:
    weights = softmax(sims.astype(np.float64), tau)
    out: dict[str, float] = {}
    for w, lab in zip(weights, labels, strict=True):
        out[lab] = out.get(lab, 0.0) + float(w)
    return out


def blend_weight(top_sim: float, cfg: CompensationConfig) -> float:
    frac = (top_sim - cfg.sim_low) / (cfg.sim_high - cfg.sim_low)
    return cfg.lambda_max * float(min(1.0, max(0.0, frac)))


def compensate(
    probs: dict[str, float], sims: np.ndarray, labels: list[str], cfg: CompensationConfig
) -> tuple[dict[str, float], float]:
    """Returns the blended distribution (over the union of labels) and the lambda used (0 = untouched)."""
    if not cfg.enabled or len(labels) == 0:
        return probs, 0.0
    lam = blend_weight(float(sims[0]), cfg)
    if lam == 0.0:
        return probs, 0.0
    y_bar = neighbour_label_distribution(sims, labels, cfg.tau)
    keys = set(probs) | set(y_bar)
    blended = {k: (1.0 - lam) * probs.get(k, 0.0) + lam * y_bar.get(k, 0.0) for k in keys}
    total = sum(blended.values())
    return {k: v / total for k, v in blended.items()}, lam


def compensate_batch(
    probs: np.ndarray, sims: np.ndarray, label_idx: np.ndarray, cfg: CompensationConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised :func:`compensate` for n rows over one label vocabulary of size V.

    ``probs`` (n, V) model distribution (rows may be all zero: no model opinion yet); ``sims`` (n, k)
    neighbour similarities, descending, ``-inf`` where a row has fewer neighbours; ``label_idx`` (n, k)
    their labels as vocabulary indices. Returns the blended (n, V) distribution and lambda per row.
    """
    out, lam, _, _ = compensate_batch_parts(probs, sims, label_idx, cfg)
    return out, lam


def compensate_batch_parts(
    probs: np.ndarray, sims: np.ndarray, label_idx: np.ndarray, cfg: CompensationConfig, scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`compensate_batch` with the blend weight of rows below ``sim_high`` multiplied by ``scale``
    (learned online, ``serving.mixing``); near-duplicates keep theirs. Returns the blended distribution,
    the lambda used, the unscaled lambda and the neighbour label distribution ``y_bar`` (n, V)."""
    n, v = probs.shape
    if not cfg.enabled or sims.size == 0:
        return probs, np.zeros(n), np.zeros(n), np.zeros((n, v))
    top = sims[:, 0]
    finite = np.isfinite(top)
    raw = cfg.lambda_max * np.clip(
        (np.where(finite, top, cfg.sim_low) - cfg.sim_low) / (cfg.sim_high - cfg.sim_low), 0.0, 1.0
    )
    lam = np.where(top < cfg.sim_high, scale * raw, raw)
    weights = np.exp((sims - np.where(finite, top, 0.0)[:, None]) / cfg.tau)  # -inf pads: weight 0
    weights /= np.maximum(weights.sum(axis=1, keepdims=True), 1e-12)
    cells = (np.arange(n)[:, None] * v + label_idx).ravel()
    y_bar = np.bincount(cells, weights=weights.ravel(), minlength=n * v).reshape(n, v)
    out = (1.0 - lam)[:, None] * probs + lam[:, None] * y_bar
    total = out.sum(axis=1, keepdims=True)
    out = np.divide(out, total, out=np.zeros_like(out), where=total > 0)
    return out, lam, raw, y_bar
