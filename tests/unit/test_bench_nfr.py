"""bench nfr's statistics: flip counts, Wilson intervals and paired bootstrap intervals of the ratios, and
the gate frontier (the update averaged with v1 and guarded by it, tuned on the evaluated events)."""

from __future__ import annotations

import numpy as np

from ops.bench.nfr import compare, frontier_summary, gate_frontier, markdown, wilson
from serving.guard import keeps_parent


def test_wilson_interval_brackets_the_rate():
    lo, hi = wilson(10, 1000)
    assert lo < 0.01 < hi and lo > 0.004 and hi < 0.02
    assert wilson(0, 100)[0] == 0.0 and wilson(0, 0) == (0.0, 1.0)


def test_compare_reports_counts_targets_and_intervals():
    rng = np.random.default_rng(0)
    v1 = rng.random(4000) < 0.8
    naive = v1.copy()
    naive[rng.choice(np.flatnonzero(v1), 120, replace=False)] = False  # 3% negative flips
    naive[rng.choice(np.flatnonzero(~v1), 200, replace=False)] = True
    ours = v1.copy()
    ours[np.flatnonzero(v1 & ~naive)[:30]] = False  # a quarter of naive's negative flips
    ours[np.flatnonzero(~v1 & naive)] = True  # all of its positive ones
    rows = compare(v1, naive, ours)
    assert rows["naive"]["nf"] == 120 and rows["driftserve"]["nf"] == 30
    assert rows["driftserve"]["pf"] == 200
    t = rows["targets"]
    assert t["nfr_ok"] and t["reduction_ok"] and t["gain_ok"]
    assert abs(t["nfr_reduction"] - 0.75) < 1e-9
    lo, hi = rows["intervals"]["nfr_reduction"]
    assert lo < 0.75 < hi
    lo, hi = rows["intervals"]["gain_kept"]
    assert lo < t["gain_kept"] < hi


def _probs(labels: np.ndarray, confidence: np.ndarray, classes: int = 3) -> np.ndarray:
    """Rows that put ``confidence`` on ``labels`` and share the rest evenly."""
    out = np.tile((1.0 - confidence)[:, None] / (classes - 1), (1, classes))
    out[np.arange(len(labels)), labels] = confidence
    return out


def test_the_gate_frontier_is_the_update_at_w1_m0_and_its_guard_keeps_v1_where_unsure():
    rng = np.random.default_rng(1)
    n = 600
    truth = rng.integers(0, 3, n)
    old_label = np.where(rng.random(n) < 0.7, truth, (truth + 1) % 3)
    # The update fixes half of v1's errors confidently and breaks a tenth of its right answers, unsure.
    new_label = old_label.copy()
    wrong, right = np.flatnonzero(old_label != truth), np.flatnonzero(old_label == truth)
    fixed, broken = wrong[: len(wrong) // 2], right[: len(right) // 10]
    new_label[fixed] = truth[fixed]
    new_label[broken] = (truth[broken] + 2) % 3
    confidence = np.full(n, 0.9)
    confidence[broken] = 0.45
    old, new = _probs(old_label, np.full(n, 0.8)), _probs(new_label, confidence)
    points = {(p["weight"], p["margin"]): p for p in gate_frontier(old, new, truth)}
    plain = points[(1.0, 0.0)]
    assert plain["accuracy"] == (new_label == truth).mean()
    assert plain["nfr"] == len(broken) / n and plain["pfr"] == len(fixed) / n
    # At margin 0.2 the unsure breaks (0.45 vs 0.275 for v1's label) keep v1's answer, the sure fixes do not.
    guarded = points[(1.0, 0.2)]
    assert guarded["nfr"] == 0.0 and guarded["pfr"] == len(fixed) / n
    # The vectorised guard is serving's: the same answers as keeps_parent row by row.
    m, kept = 0.2, []
    for i in range(n):
        scores = {str(j): float(new[i, j]) for j in range(3)}
        keep = keeps_parent(scores, str(new_label[i]), str(old_label[i]), m)
        kept.append((old_label[i] if keep else new_label[i]) == truth[i])
    assert np.mean(kept) == guarded["accuracy"]
    summary = frontier_summary(
        list(points.values()),
        v1_acc=float((old_label == truth).mean()),
        naive_gain=float(plain["accuracy"] - (old_label == truth).mean()),
    )
    best = summary["lowest_nfr_keeping_gain"]
    assert best["nfr"] == 0.0 and best["gain_kept"] >= 0.95
    assert summary["most_gain_at_nfr_target"]["nfr"] <= 0.01 and summary["any_meets_all"]


def test_frontier_summary_says_when_no_gate_reaches_the_targets():
    v1_acc, naive_gain = 0.75, 0.04
    points = [  # every point that keeps the gain flips too much, every low-NFR point keeps too little
        {"weight": 1.0, "margin": 0.0, "accuracy": 0.79, "nfr": 0.04, "pfr": 0.08},
        {"weight": 1.0, "margin": 0.2, "accuracy": 0.788, "nfr": 0.015, "pfr": 0.053},
        {"weight": 1.0, "margin": 0.3, "accuracy": 0.78, "nfr": 0.008, "pfr": 0.038},
    ]
    summary = frontier_summary(points, v1_acc, naive_gain)
    assert summary["lowest_nfr_keeping_gain"]["margin"] == 0.2
    assert summary["most_gain_at_nfr_target"]["margin"] == 0.3
    assert abs(summary["most_gain_at_nfr_target"]["gain_kept"] - 0.75) < 1e-9
    assert not summary["any_meets_all"]
    assert frontier_summary(points[:1], v1_acc, naive_gain)["most_gain_at_nfr_target"] is None


def test_the_report_lists_the_gate_frontier():
    rng = np.random.default_rng(0)
    v1 = rng.random(500) < 0.8
    naive = v1 | (rng.random(500) < 0.1)
    modes = {"head": compare(v1, naive, v1), "served": compare(v1, naive, v1)}
    summary = frontier_summary(
        [{"weight": 0.8, "margin": 0.1, "accuracy": 0.84, "nfr": 0.012, "pfr": 0.05}], 0.8, 0.04
    )
    result = {
        "stream": "s.jsonl.gz",
        "domain": "d",
        "device": "cpu",
        "modes": modes,
        "windows": {
            "v1_train": 1,
            "update_new_train": 1,
            "update_snapshot_train": 1,
            "replay_share": 0.5,
            "evaluated": 500,
        },
        "memory_only_accuracy": 0.7,
        "memory_weight": {},
        "timings": {},
        "gate_frontier": {"naive": summary, "driftserve": summary},
    }
    text = markdown(result)
    assert "| naive | NFR 1.2%, kept 100.0% (w 0.8, m 0.1) | none | not reachable |" in text
