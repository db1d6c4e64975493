"""bench serve's capacity rule and report."""

from __future__ import annotations

import json

from ops.bench.serve import capacity, write_outputs


def _level(c: int, rps: float, p99: float, errors: int = 0) -> dict:
    return {"concurrency": c, "throughput_rps": rps, "p50_ms": p99 / 2, "p99_ms": p99, "errors": errors}


def test_capacity_is_the_best_throughput_within_the_budget_without_errors():
    levels = [
        _level(1, 40.0, 30.0),
        _level(4, 90.0, 95.0),
        _level(8, 120.0, 101.0),
        _level(6, 100.0, 80.0, 1),
    ]
    assert capacity(levels, 100.0) == 90.0
    assert capacity([_level(1, 40.0, 150.0)], 100.0) == 0.0


def test_report_states_the_memory_actually_served(tmp_path):
    result = {
        "levels": [1, 4],
        "duration_s": 15.0,
        "p99_budget_ms": 100.0,
        "memory_entries": 2000,
        "memory_entries_served": 6000,
        "naive": [_level(1, 50.0, 25.0), _level(4, 60.0, 93.0)],
        "driftserve": [_level(1, 45.0, 28.0), _level(4, 125.0, 70.0)],
        "capacity_rps": {"naive": 60.0, "driftserve": 125.0},
        "ratio": 125.0 / 60.0,
    }
    write_outputs(tmp_path, result)
    md = (tmp_path / "serve.md").read_text()
    assert "driftserve 125.0 req/s, naive 60.0 req/s, ratio 2.08" in md
    assert "error memory: 6000 entries served (2000 seeded by this run)" in md
    assert "| driftserve | 4 | 125.0 | 35.0 | 70.0 | 0 |" in md
    assert json.loads((tmp_path / "serve.json").read_text())["memory_entries_served"] == 6000
    assert (tmp_path / "serve.png").stat().st_size > 0
