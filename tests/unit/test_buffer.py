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


def test_capacity_drops_oldest(tmp_path):
    buf = ReplayBuffers(tmp_path, capacity=3)
    buf.add([_ev(i) for i in range(5)])
    assert [e.event_id for e in buf.examples("d")] == ["e2", "e3", "e4"]
