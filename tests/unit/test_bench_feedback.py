"""bench feedback's report: the idle and the loaded feedback-to-fix side by side."""

from __future__ import annotations

from ops.bench.feedback import write_outputs


def _fix(rate: float, samples: list[float]) -> dict:
    return {
        "target_rate": rate,
        "achieved_rate": rate,
        "events": 20,
        "replicas": ["a"],
        "sampled": len(samples),
        "not_fixed_within_timeout": 0,
        "fix_seconds": {"n": len(samples), "p50": 0.1, "p90": 0.2, "p99": 0.3, "max": 0.3},
        "within_1s": 1.0,
        "samples": samples,
    }


def test_report_has_the_idle_phase_beside_the_loaded_one(tmp_path):
    result = {
        "fix_idle": _fix(1.0, [0.05, 0.1, 0.3]),
        "fix": _fix(200.0, [0.1, 0.2]),
        "ingestion": [{"fast_path": False, "events_per_s": 150.0, "applied": 1000}],
    }
    write_outputs(tmp_path, result)
    md = (tmp_path / "feedback.md").read_text()
    assert "when idle (3 events a second apart): p50 100 ms, p90 200 ms, max 300 ms" in md
    assert "feedback at 200 events/s" in md
    assert (tmp_path / "feedback.png").stat().st_size > 0


def test_report_of_an_older_result_without_the_idle_phase(tmp_path):
    write_outputs(tmp_path, {"fix": _fix(200.0, [0.1]), "ingestion": []})
    assert "idle" not in (tmp_path / "feedback.md").read_text()
