"""bench nfr's statistics: flip counts, Wilson intervals and paired bootstrap intervals of the ratios."""

from __future__ import annotations

import numpy as np

from ops.bench.nfr import compare, wilson


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
