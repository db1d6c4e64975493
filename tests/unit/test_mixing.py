"""Online head / memory mix calibration: steps, convergence, window, forgetting, the served record."""

from __future__ import annotations

import json
import random

import pytest

from serving.mixing import (
    S_MIN,
    TOP_LABELS,
    W_MIN,
    WINDOW,
    MixCalibrator,
    Outcome,
    ServedMix,
    comp_step,
    encode_batch,
    step,
)


def test_a_step_moves_toward_the_side_that_gave_the_label_more_probability():
    assert step(0.5, p_head=0.9, p_memory=0.1) < 0.5
    assert step(0.5, p_head=0.1, p_memory=0.9) > 0.5
    assert step(0.5, p_head=0.4, p_memory=0.4) == 0.5
    assert step(W_MIN, p_head=1.0, p_memory=0.0) == W_MIN  # never switched off
    assert step(1 - W_MIN, p_head=0.0, p_memory=1.0) == 1 - W_MIN


def _feed(cal: MixCalibrator, outcomes, domain="d", adapter="v1", start=0):
    for i, (ph, pm) in enumerate(outcomes):
        cal.observe(f"e{start + i}", domain, Outcome(adapter, ph, pm))


def test_the_weight_finds_the_best_mix_not_just_the_better_side():
    # Each side gives the label 0.9 on half of the answers and 0.1 on the other: log-loss is lowest at
    # an even mix, which a vote for the better side would never reach.
    rng = random.Random(0)
    outcomes = [(0.9, 0.1) if rng.random() < 0.5 else (0.1, 0.9) for _ in range(800)]
    cal = MixCalibrator()
    _feed(cal, outcomes)
    w, n = cal.weight("d", "v1", prior=0.05)
    assert n == 800 and 0.35 < w < 0.65
    # Then the memory becomes reliably right: the weight follows within a few hundred answers.
    _feed(cal, [(0.3, 0.95)] * 300, start=800)
    assert cal.weight("d", "v1", prior=0.05)[0] > 0.9


def test_prior_until_the_first_outcome_and_one_state_per_version():
    cal = MixCalibrator()
    assert cal.weight("d", "v1", prior=0.3) == (0.3, 0)
    _feed(cal, [(0.9, 0.1)] * 50)
    assert cal.weight("d", "v1", prior=0.3)[0] < 0.3
    assert cal.weight("d", "v2", prior=0.3) == (0.3, 0)  # a new version starts from its own prior
    assert cal.weight("other", "v1", prior=0.3) == (0.3, 0)


def test_only_the_last_window_counts_and_the_result_depends_on_the_log_alone():
    rng = random.Random(1)
    outcomes = [(rng.random(), rng.random()) for _ in range(WINDOW + 300)]
    full, recent = MixCalibrator(), MixCalibrator()
    _feed(full, outcomes)
    _feed(recent, outcomes[-WINDOW:], start=300)
    assert full.weight("d", "v1", 0.4) == recent.weight("d", "v1", 0.4)
    assert full.weight("d", "v1", 0.4) == full.weight("d", "v1", 0.4)  # cached, same answer


def test_a_forgotten_outcome_leaves_no_trace():
    rng = random.Random(2)
    outcomes = [(rng.random(), rng.random()) for _ in range(200)]
    cal, clean = MixCalibrator(), MixCalibrator()
    _feed(cal, outcomes)
    cal.weight("d", "v1", 0.5)  # fills the cache the forget must invalidate
    forgotten = {f"e{i}" for i in range(0, 200, 7)}
    cal.forget(forgotten)
    for i, (ph, pm) in enumerate(outcomes):
        if f"e{i}" not in forgotten:
            clean.observe(f"e{i}", "d", Outcome("v1", ph, pm))
    assert cal.weight("d", "v1", 0.5) == clean.weight("d", "v1", 0.5)


def test_served_mix_round_trips_keeps_the_top_labels_and_judges_a_label():
    head = {f"l{i}": (i + 1) / 1000 for i in range(40)}
    mix = ServedMix("v7", head, {"l39": 0.6, "l0": 0.4})
    back = ServedMix.from_json(mix.to_json())
    assert back is not None and back.adapter == "v7" and len(back.head) == TOP_LABELS
    assert set(back.head) == {f"l{i}" for i in range(40 - TOP_LABELS, 40)}
    assert back.outcome("l39") == ("v7", 0.04, 0.6, 0.0, 0.0, 0.0)
    assert back.outcome("l0")[:3] == ("v7", 0.0, 0.4)  # beyond the head's top labels: probability 0
    assert back.outcome("unseen")[:3] == ("v7", 0.0, 0.0)
    alone = ServedMix.from_json(ServedMix("", pre={"a": 0.7, "b": 0.3}, y_bar={"b": 1.0}, lam=0.4).to_json())
    assert alone.outcome("b") == ("", None, None, 0.4, 0.3, 1.0)  # memory alone: nothing for the mix


@pytest.mark.parametrize("raw", [b"", b"[1, 2]", b"{}", json.dumps({"v": "x", "h": [], "m": {}}).encode()])
def test_a_foreign_record_is_no_mix(raw):
    assert ServedMix.from_json(raw) is None


def test_a_batch_encodes_what_each_answer_mixed_for_small_and_large_label_sets():
    import numpy as np

    probs = np.array([[0.7, 0.3], [0.1, 0.9]])
    mem = np.array([[0.2, 0.5, 0.3], [0.6, 0.2, 0.2]])
    mixed = (["a", "b"], probs, ["a", "b", "c"], mem)
    comp = (["a", "b", "c"], mem, np.array([[0, 1.0, 0], [1.0, 0, 0]]), np.array([0.0, 0.45]))
    rows = [ServedMix.from_json(r) for r in encode_batch('v"1', mixed, comp)]
    assert rows[0] == ServedMix('v"1', {"a": 0.7, "b": 0.3}, {"a": 0.2, "b": 0.5, "c": 0.3})  # lam 0
    assert rows[1].lam == 0.45 and rows[1].y_bar == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert encode_batch("", None, (comp[0], mem, comp[2], np.array([0.0, 0.3])))[0] is None
    many = [f"l{i}" for i in range(TOP_LABELS + 4)]
    wide = np.tile(np.arange(len(many), dtype=float) / 100, (2, 1))
    (first, _) = [
        ServedMix.from_json(r) for r in encode_batch("v", (many, wide, ["a"], np.ones((2, 1))), None)
    ]
    assert len(first.head) == TOP_LABELS and first.outcome(many[-1])[:3] == ("v", wide[0, -1], 0.0)
    assert first.outcome("a")[:3] == ("v", 0.0, 1.0)
    assert first.outcome("l0")[:3] == ("v", 0.0, 0.0)  # not among the head's top labels


def test_the_compensation_scale_learns_down_where_neighbours_mislead_and_stays_where_they_help():
    assert comp_step(1.0, lam=0.5, p_pre=0.9, p_neighbours=0.1) < 1.0
    assert comp_step(1.0, lam=0.5, p_pre=0.1, p_neighbours=0.9) == 1.0  # never above the design's blend
    assert comp_step(S_MIN, lam=0.5, p_pre=1.0, p_neighbours=0.0) == S_MIN
    cal = MixCalibrator()
    for i in range(300):
        cal.observe(f"m{i}", "reviews", Outcome("", None, None, 0.5, 0.8, 0.2))  # neighbours mostly wrong
        cal.observe(f"h{i}", "spam", Outcome("", None, None, 0.5, 0.3, 0.9))  # neighbours mostly right
    assert cal.comp_scale("reviews", "")[0] < 0.2
    assert cal.comp_scale("spam", "") == (1.0, 300)
    assert cal.weight("reviews", "", 0.5) == (0.5, 0)  # a memory-only answer teaches the mix nothing
    assert cal.comp_scale("other", "") == (1.0, 0)
