from __future__ import annotations

from learners.buffer import ReplayBuffers
from streams.schemas import FeedbackEvent


def _ev(i: int, domain: str = "d", label: str = "a") -> FeedbackEvent:
    return FeedbackEvent(event_id=f"e{i}", text=f"t{i}", label=label, domain=domain, ts=float(i))


def test_idempotent_and_persistent(tmp_path):
    buf = ReplayBuffers(tmp_path)
    assert buf.add([_ev(1), _ev(2), _ev(1)]) == ["d"]
    assert buf.add([_ev(2)]) == []
    assert [e.event_id for e in buf.examples("d")] == ["e1", "e2"]
    assert buf.new_since_train("d") == 2
    buf.mark_trained("d")
    assert buf.new_since_train("d") == 0
    again = ReplayBuffers(tmp_path)
    assert [e.event_id for e in again.examples("d")] == ["e1", "e2"]


def test_torn_last_line_is_skipped(tmp_path):
    buf = ReplayBuffers(tmp_path)
    buf.add([_ev(1)])
    with (tmp_path / "d.jsonl").open("a") as fh:
        fh.write('{"domain": "d", "event_id": "e2", "te')
    assert [e.event_id for e in ReplayBuffers(tmp_path).examples("d")] == ["e1"]


def test_capacity_is_a_reservoir_that_keeps_the_recent_half(tmp_path):
    buf = ReplayBuffers(tmp_path, capacity=100)
    buf.add([_ev(i) for i in range(1000)])
    ids = [int(e.event_id[1:]) for e in buf.examples("d")]
    assert len(ids) == 100
    assert set(range(950, 1000)) <= set(ids)  # the newest capacity // 2 always stay
    old = [i for i in ids if i < 950]
    assert len(old) == 50 and min(old) < 400  # old data stays represented, not just the latest


def test_files_are_compacted_and_reload_the_same_examples(tmp_path):
    buf = ReplayBuffers(tmp_path, capacity=10)
    for i in range(100):
        buf.add([_ev(i)])
    assert sum(1 for _ in (tmp_path / "d.jsonl").open()) <= 20
    again = ReplayBuffers(tmp_path, capacity=10)
    assert {e.event_id for e in buf.examples("d")} <= {e.event_id for e in again.examples("d")} | {
        e.event_id for e in buf.examples("d")
    }
    assert set(range(95, 100)) <= {int(e.event_id[1:]) for e in again.examples("d")}


def test_forget_bumps_the_generation_and_refuses_redelivery(tmp_path):
    buf = ReplayBuffers(tmp_path)
    buf.add([_ev(1), _ev(2, domain="x")])
    examples, generation, new = buf.snapshot("d")
    assert [e.event_id for e in examples] == ["e1"] and generation == 0 and new == 1
    assert buf.forget(["e1"], None) == ["d"]
    assert buf.generation("d") == 1 and buf.generation("x") == 0
    buf.add([_ev(1)])
    assert buf.examples("d") == [] and ReplayBuffers(tmp_path).examples("d") == []


def test_mark_trained_keeps_arrivals_during_a_run(tmp_path):
    buf = ReplayBuffers(tmp_path)
    buf.add([_ev(i) for i in range(5)])
    _, _, consumed = buf.snapshot("d")
    buf.add([_ev(i) for i in range(5, 8)])  # arrives while the worker trains
    buf.mark_trained("d", consumed)
    assert buf.new_since_train("d") == 3
