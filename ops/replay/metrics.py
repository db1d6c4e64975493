"""Prequential quality measures: plain functions over aligned lists of truths and predictions.

A missing prediction (``None``: the system had no answer or the request failed) counts as wrong. Macro-F1
averages over the labels that occur in the truths or in the (non-missing) predictions, the usual
convention, so a system that never predicts a class that exists is charged for it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def accuracy(truth: Sequence[str], pred: Sequence[str | None]) -> float | None:
    if len(truth) != len(pred):
        raise ValueError("truth and pred must have the same length")
    if not truth:
        return None
    return sum(t == p for t, p in zip(truth, pred, strict=True)) / len(truth)


def macro_f1(truth: Sequence[str], pred: Sequence[str | None]) -> float | None:
    if len(truth) != len(pred):
        raise ValueError("truth and pred must have the same length")
    if not truth:
        return None
    labels = set(truth) | {p for p in pred if p is not None}
    scores = []
    for lab in labels:
        tp = sum(t == lab and p == lab for t, p in zip(truth, pred, strict=True))
        fp = sum(t != lab and p == lab for t, p in zip(truth, pred, strict=True))
        fn = sum(t == lab and p != lab for t, p in zip(truth, pred, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


def summary(truth: Sequence[str], pred: Sequence[str | None]) -> dict[str, float | int | None]:
    return {"n": len(truth), "accuracy": accuracy(truth, pred), "macro_f1": macro_f1(truth, pred)}


def sliding(
    truth: Sequence[str], pred: Sequence[str | None], window: int, step: int | None = None
) -> list[dict[str, float | int | None]]:
    """Accuracy and macro-F1 over the last ``window`` events, every ``step`` events (quality over time)."""
    if window < 1:
        raise ValueError("window must be at least 1")
    n = len(truth)
    if n == 0:
        return []
    window = min(window, n)
    step = step or max(1, window // 5)
    points = []
    ends = list(range(window, n + 1, step))
    if ends[-1] != n:
        ends.append(n)
    for end in ends:
        t, p = truth[end - window : end], pred[end - window : end]
        points.append({"end": end, "accuracy": accuracy(t, p), "macro_f1": macro_f1(t, p)})
    return points


def per_group(
    truth: Sequence[str], pred: Sequence[str | None], groups: Sequence[str | None]
) -> dict[str, dict[str, float | int | None]]:
    """Summary per group (domain); ``None`` groups are reported under ``"(none)"``."""
    idx: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        idx.setdefault(g if g is not None else "(none)", []).append(i)
    return {g: summary([truth[i] for i in rows], [pred[i] for i in rows]) for g, rows in sorted(idx.items())}


def flip_rates(
    truth: Sequence[str], old: Sequence[str | None], new: Sequence[str | None]
) -> dict[str, float | int | None]:
    """Negative flips (old right, new wrong) and positive flips (old wrong, new right), as rates."""
    if not len(truth) == len(old) == len(new):
        raise ValueError("truth, old and new must have the same length")
    n = len(truth)
    nf = sum(o == t and p != t for t, o, p in zip(truth, old, new, strict=True))
    pf = sum(o != t and p == t for t, o, p in zip(truth, old, new, strict=True))
    return {"n": n, "nfr": nf / n if n else None, "pfr": pf / n if n else None}


def percentiles(values: Sequence[float], qs: Sequence[float] = (50, 90, 95, 99)) -> dict[str, float | None]:
    """Named percentiles (``p50`` ...) plus mean and max; ``None`` everywhere for no values."""
    out: dict[str, float | None] = {}
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    for q in qs:
        out[f"p{q:g}"] = float(np.percentile(arr, q)) if arr.size else None
    out["mean"] = float(arr.mean()) if arr.size else None
    out["max"] = float(arr.max()) if arr.size else None
    out["n"] = int(arr.size)
    return out
