"""The rollout controller's rules on their own: offline gate, per-domain overrides, interval analysis."""

from __future__ import annotations

import pytest

from ops.rollout_policy import (
    GatePolicy,
    RolloutPolicy,
    Window,
    analyse,
    binomial_sf,
    offline_gate,
    parse_gate_overrides,
)

GOOD = {
    "holdout_size": 40.0,
    "holdout_accuracy": 0.90,
    "current_accuracy": 0.88,
    "nfr": 0.0,
    "pfr": 0.05,
    "ece": 0.06,
    "current_ece": 0.05,
    "compat_new_old": 0.85,
    "compat_old_old": 0.84,
    "adapter_accuracy": 0.80,
}


def _failed(report: dict, policy: GatePolicy | None = None) -> set[str]:
    decision = offline_gate(report, policy or GatePolicy())
    return {c.name for c in decision.checks if not c.passed}


def test_a_better_compatible_candidate_passes():
    decision = offline_gate(GOOD, GatePolicy())
    assert decision.passed, decision.reason
    assert {c.name for c in decision.checks} == {
        "evaluated",
        "accuracy",
        "nfr",
        "calibration",
        "adapter",
        "compatibility",
    }


@pytest.mark.parametrize(
    ("change", "check"),
    [
        ({"holdout_accuracy": 0.80}, "accuracy"),  # below current - epsilon
        ({"nfr": 0.10}, "nfr"),
        ({"ece": 0.30}, "calibration"),
        ({"compat_new_old": 0.70}, "compatibility"),
        ({"adapter_accuracy": 0.10}, "adapter"),  # e.g. flipped labels that the memory would overrule
    ],
)
def test_each_check_blocks_on_its_own(change, check):
    assert _failed({**GOOD, **change}) == {check}


def test_no_evaluation_is_no_pass():
    assert not offline_gate({}, GatePolicy()).passed
    assert _failed({**GOOD, "holdout_size": 2.0}) == {"evaluated"}


def test_missing_flip_or_calibration_figures_fail_closed():
    report = {k: v for k, v in GOOD.items() if k not in {"nfr", "ece"}}
    assert _failed(report) == {"nfr", "calibration"}


def test_first_adapter_has_no_compatibility_check():
    report = {k: v for k, v in GOOD.items() if not k.startswith("compat")}
    decision = offline_gate(report, GatePolicy())
    assert decision.passed and "compatibility" not in {c.name for c in decision.checks}


def test_per_domain_overrides():
    overrides = parse_gate_overrides('{"strict": {"max_nfr": 0.01}}', GatePolicy(max_nfr=0.2))
    policy = RolloutPolicy(gate=GatePolicy(max_nfr=0.2), gate_overrides=overrides)
    report = {**GOOD, "nfr": 0.05}
    assert offline_gate(report, policy.gate_for("other")).passed
    assert _failed(report, policy.gate_for("strict")) == {"nfr"}
    assert parse_gate_overrides("") == {}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("not json", "not JSON"),
        ("[1]", "must map domain"),
        ('{"d": {"max_nfr": "x"}}', "must be numbers"),
        ('{"d": {"unknown": 1}}', "fields must be among"),
        ('{"d": {"max_nfr": -1}}', "max_nfr must be in"),
        ('{"d": {"epsilon": 1.5}}', "epsilon must be in"),
        ('{"d": {"first_alpha": 0}}', "0 would never pass"),
        ('{"d": {"min_holdout": 0}}', "min_holdout must be a whole number"),
        ('{"d": {"min_holdout": 2.5}}', "min_holdout must be a whole number"),
    ],
)
def test_bad_overrides_are_refused_with_a_reason(raw, reason):
    with pytest.raises(ValueError, match=reason):
        parse_gate_overrides(raw)


def _obs(variant: str, label: str, stable: str, rid: str, latency: float = 10.0, error: str | None = None):
    return {
        "variant": variant,
        "label": label,
        "stable_label": stable,
        "rid": rid,
        "latency_ms": latency,
        "error": error,
    }


def test_window_counts_flips_against_the_stable_answer():
    w = Window()
    cases = [("a", "a", "a"), ("b", "a", "a"), ("a", "b", "a"), ("b", "b", "a")]  # new, old, truth
    for i, (new, old, truth) in enumerate(cases):
        obs = _obs("canary", new, old, str(i))
        w.add_answer(obs)
        w.add_label(obs, truth)
    s = w.summary()
    assert s["labelled"] == 4 and s["nfr"] == 0.25 and s["pfr"] == 0.25
    assert s["accuracy"] == 0.5 and s["stable_accuracy"] == 0.5 and s["agreement"] == 0.5


POLICY = RolloutPolicy(min_requests=5, min_feedback=4, max_nfr=0.1, max_error_rate=0.05, max_p99_ms=100)


def _window(n: int, *, wrong: int = 0, errors: int = 0, latency: float = 10.0) -> Window:
    w = Window()
    for i in range(n):
        obs = _obs("canary", "x" if i < wrong else "a", "a", str(i), latency, "Boom" if i < errors else None)
        w.add_answer(obs)
        w.add_label(obs, "a")
    return w


def test_analysis_verdicts():
    assert analyse(_window(10), POLICY)[0] is True
    assert analyse(_window(3), POLICY)[0] is None  # inconclusive, not a pass
    verdict, reason, _ = analyse(_window(10, wrong=4), POLICY)  # 4 flips of 10, bound 0.1: p = 0.013
    assert verdict is False and "nfr 0.400 > 0.1 (4 of 10 labelled, p=0.0128)" in reason
    verdict, reason, _ = analyse(_window(10, errors=2), POLICY)
    assert verdict is False and "error rate" in reason
    verdict, reason, _ = analyse(_window(10, latency=500.0), POLICY)
    assert verdict is False and "p99" in reason


def test_slow_answers_fail_the_candidate_only_if_the_stable_ones_were_faster():
    def window(candidate_ms: float, stable_ms: float) -> Window:
        w = _window(10, latency=candidate_ms)
        for i in range(20):
            w.add_answer(_obs("stable", "a", "a", f"s{i}", stable_ms))
        return w

    # An overloaded node: both over the 100 ms bound, the candidate no slower than 1.5 x the stable.
    verdict, reason, summary = analyse(window(500.0, 400.0), POLICY)
    assert verdict is True and "as is the stable's 400 ms" in reason and summary["stable_p99_ms"] == 400.0
    verdict, reason, _ = analyse(window(700.0, 400.0), POLICY)
    assert verdict is False and "p99 700 ms > 100 ms and > 1.5 x stable 400 ms" in reason
    assert analyse(window(90.0, 20.0), POLICY)[0] is True  # within the bound: the ratio does not matter


def test_labels_are_only_judged_with_enough_of_them():
    w = Window()
    for i in range(10):
        w.add_answer(_obs("canary", "x", "a", str(i)))
    w.add_label(_obs("canary", "x", "a", "0"), "a")  # one negative flip out of one labelled answer
    assert analyse(w, POLICY)[0] is True


def test_a_first_adapter_must_beat_memory_only_by_the_first_min_gain():
    from ops.rollout_policy import GatePolicy, offline_gate

    report = {
        "holdout_size": 100.0,
        "holdout_accuracy": 0.99,
        "current_accuracy": 0.99,
        "nfr": 0.0,
        "pfr": 0.0,
        "ece": 0.0,
    }
    strict = GatePolicy(first_min_gain=0.01)
    first = offline_gate({**report, "has_parent": 0.0}, strict)
    assert not first.passed and any(c.name == "first_gain" and not c.passed for c in first.checks)
    assert offline_gate({**report, "has_parent": 1.0}, strict).passed  # a continued run: not a first adapter
    assert offline_gate({**report, "has_parent": 0.0}, GatePolicy(first_min_gain=0)).passed  # 0: off
    gained = {**report, "has_parent": 0.0, "holdout_accuracy": 1.0, "current_accuracy": 0.9, "pfr": 0.1}
    assert offline_gate(gained, strict).passed  # 10 positive flips, no negative: p = 0.001


def test_a_first_adapters_gain_must_be_more_than_noise():
    """The reviews replay's first adapters: 1 positive flip on 27 held out passes the bare margin but is
    noise (p = 0.5); 16 positive against 3 negative on 143 is not (p = 0.002)."""
    from ops.rollout_policy import GatePolicy, offline_gate

    lucky = {
        "holdout_size": 27.0,
        "holdout_accuracy": 13 / 27,
        "current_accuracy": 12 / 27,
        "nfr": 0.0,
        "pfr": 1 / 27,
        "ece": 0.1,
        "current_ece": 0.1,
        "has_parent": 0.0,
    }
    decision = offline_gate(lucky, GatePolicy())
    assert not decision.passed
    (gain,) = [c for c in decision.checks if c.name == "first_gain"]
    assert "1 positive vs 0 negative flips, sign test p=0.5 (max 0.05)" in gain.detail
    assert offline_gate(lucky, GatePolicy(first_alpha=1.0)).passed  # the bare margin
    real = {**lucky, "holdout_size": 143.0, "holdout_accuracy": 0.783, "current_accuracy": 0.692}
    real |= {"nfr": 3 / 143, "pfr": 16 / 143}
    assert offline_gate(real, GatePolicy()).passed, offline_gate(real, GatePolicy()).reason


def test_calibration_on_a_handful_of_examples_is_reported_not_measured():
    small = {**GOOD, "holdout_size": 5.0, "ece": 0.37, "current_ece": 0.17}
    decision = offline_gate(small, GatePolicy())
    assert decision.passed, decision.reason
    (calibration,) = [c for c in decision.checks if c.name == "calibration"]
    assert "not measured: 5 examples, min 30" in calibration.detail
    assert _failed({**small, "holdout_size": 30.0}) == {"calibration"}


def _paired(negative: int, positive: int, same: int) -> Window:
    """Labelled canary answers: ``negative`` flips, ``positive`` flips, ``same`` both right."""
    w = Window()
    cases = [("x", "a")] * negative + [("a", "x")] * positive + [("a", "a")] * same  # (canary, stable)
    for i, (new, old) in enumerate(cases):
        obs = _obs("canary", new, old, str(i))
        w.add_answer(obs)
        w.add_label(obs, "a")
    return w


def test_label_checks_fail_an_interval_only_on_significant_evidence():
    policy = RolloutPolicy(min_requests=5, min_feedback=5, max_nfr=0.05, epsilon=0.02)
    # The reviews replay's second adapter (better on its holdout and in shadow) was rolled back on these
    # two intervals: one flip in 23 labels, then 3 negative against 1 positive in 60. Both are noise.
    for negative, positive, same in [(1, 0, 22), (3, 1, 56)]:
        verdict, reason, summary = analyse(_paired(negative, positive, same), policy)
        assert summary["accuracy"] < summary["stable_accuracy"] - policy.epsilon
        assert verdict is True, reason
        assert "sign test" in reason and "not significant at 0.05" in reason
    verdict, reason, _ = analyse(_paired(1, 0, 22), policy)
    assert "accuracy 0.957 < stable 1.000 - 0.02 (1 negative vs 0 positive flips, sign test p=0.5" in reason
    # A canary that breaks: every labelled answer flipped, the minimum number of labels is enough.
    verdict, reason, _ = analyse(_paired(5, 0, 0), policy)
    assert verdict is False and "nfr 1.000" in reason and "sign test p=0.0312" in reason
    # Worse by a margin that the paired flips make clear: 12 negative vs 2 positive (p = 0.0065), and
    # a flip rate of 12/100 against a 5% bound (p = 0.0043).
    verdict, reason, _ = analyse(_paired(12, 2, 86), policy)
    assert verdict is False and "accuracy" in reason and "nfr" in reason
    # Many flips both ways (churn): the accuracy is level, the flip rate alone fails it.
    verdict, reason, _ = analyse(_paired(12, 12, 76), policy)
    assert verdict is False and "nfr" in reason and "accuracy" not in reason
    # alpha 1 keeps the bare bounds: any excess fails.
    assert analyse(_paired(1, 0, 22), RolloutPolicy(min_requests=5, max_nfr=0.05, alpha=1.0))[0] is False


def test_binomial_tail_matches_the_direct_sum():
    from fractions import Fraction
    from math import comb

    def direct(k: int, n: int, p: Fraction) -> float:
        return float(sum(comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))

    for k, n, p in [
        (1, 23, Fraction(1, 20)),
        (3, 60, Fraction(1, 20)),
        (4, 4, Fraction(1, 2)),
        (7, 30, Fraction(1, 5)),
    ]:
        assert binomial_sf(k, n, float(p)) == pytest.approx(direct(k, n, p), rel=1e-9)
    assert binomial_sf(0, 10, 0.3) == 1.0 and binomial_sf(11, 10, 0.3) == 0.0
    assert binomial_sf(1, 10, 0.0) == 0.0 and binomial_sf(10, 10, 1.0) == 1.0
    assert binomial_sf(5000, 10000, 0.5) == pytest.approx(0.50399, abs=1e-4)  # no underflow at large n
