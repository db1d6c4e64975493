from __future__ import annotations

import pytest

from ops.replay import metrics


def test_accuracy_and_macro_f1_count_missing_answers_as_wrong() -> None:
    truth = ["a", "a", "b", "b"]
    pred = ["a", None, "b", "a"]
    assert metrics.accuracy(truth, pred) == 0.5
    # a: tp 1, fp 1, fn 1 -> 0.5; b: tp 1, fp 0, fn 1 -> 2/3
    assert metrics.macro_f1(truth, pred) == pytest.approx((0.5 + 2 / 3) / 2)
    assert metrics.accuracy([], []) is None and metrics.macro_f1([], []) is None


def test_macro_f1_charges_predicted_labels_that_never_occur() -> None:
    assert metrics.macro_f1(["a", "a"], ["a", "c"]) == pytest.approx((2 / 3 + 0.0) / 2)


def test_a_constant_majority_predictor_has_the_expected_macro_f1() -> None:
    # README check: static 'web' on a three-class stream with about half web -> about 0.22.
    truth = ["web"] * 50 + ["android"] * 25 + ["iphone"] * 25
    assert metrics.macro_f1(truth, ["web"] * 100) == pytest.approx((2 * 0.5 / 1.5) / 3)


def test_sliding_windows_end_at_the_last_event() -> None:
    truth = ["a"] * 10
    pred = ["a"] * 5 + ["b"] * 5
    points = metrics.sliding(truth, pred, window=4, step=3)
    assert [p["end"] for p in points] == [4, 7, 10]
    assert [p["accuracy"] for p in points] == [1.0, 0.5, 0.0]
    assert metrics.sliding([], [], 5) == []
    assert metrics.sliding(["a"], ["a"], 50)[0]["end"] == 1


def test_per_group_and_flips() -> None:
    groups = metrics.per_group(["a", "b", "a"], ["a", "a", "a"], ["x", None, "x"])
    assert groups["x"]["accuracy"] == 1.0 and groups["(none)"]["n"] == 1
    flips = metrics.flip_rates(["a", "a", "b", "b"], ["a", "b", "a", "b"], ["b", "a", "b", "b"])
    assert flips == {"n": 4, "nfr": 0.25, "pfr": 0.5}


def test_percentiles() -> None:
    p = metrics.percentiles([1.0, 2.0, 3.0, 4.0, 100.0])
    assert p["p50"] == 3.0 and p["max"] == 100.0 and p["n"] == 5
    assert metrics.percentiles([])["p99"] is None
