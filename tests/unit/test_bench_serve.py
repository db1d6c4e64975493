"""bench serve's capacity rule, report and CPU accounting."""

from __future__ import annotations

import json

import pytest

from ops.bench.serve import capacity, cpu_report, process_cpu, stage_report, stage_totals, write_outputs


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


def _metrics_text(batches: list[int], encode_s: float, retrieval_s: float, comp: list[float]) -> str:
    """What a replica's /metrics says after serving ``batches`` (the serving module's metric names)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry()
    size = Histogram("driftserve_batch_size", "texts per model batch", registry=registry)
    stage = Histogram("driftserve_stage_latency_seconds", "stage", ["stage"], registry=registry)
    Counter("driftserve_requests", "other metrics are ignored", registry=registry).inc(7)
    for b in batches:
        size.observe(b)
        stage.labels("encode").observe(encode_s)
        stage.labels("retrieval").observe(retrieval_s)
    for c in comp:
        stage.labels("compensation").observe(c)
    return generate_latest(registry).decode()


def test_stage_totals_and_report_give_per_batch_times_between_two_reads():
    before = stage_totals(_metrics_text([2, 4], 0.010, 0.001, [0.002] * 3))
    assert before["batches"] == 2 and before["texts"] == 6
    assert before["encode_s"] == pytest.approx(0.020) and before["compensation_n"] == 3
    after = stage_totals(_metrics_text([2, 4, 3, 5, 4, 4], 0.010, 0.001, [0.002] * 11))
    report = stage_report(before, after)
    assert report["batches"] == 4 and report["mean_batch"] == pytest.approx(4.0)
    assert report["encode_ms_per_batch"] == pytest.approx(10.0)
    assert report["retrieval_ms_per_batch"] == pytest.approx(1.0)
    assert report["groups_per_batch"] == pytest.approx(2.0)  # 8 compensation groups over 4 batches
    assert report["compensation_ms_per_batch"] == pytest.approx(4.0)
    assert report["retrieval_compensation_share_of_encode"] == pytest.approx(0.5)
    assert stage_report(after, after) == {"batches": 0}


def test_report_says_where_driftserve_batches_spent_their_time(tmp_path):
    stages = {
        "batches": 400,
        "mean_batch": 3.1,
        "encode_ms_per_batch": 20.5,
        "retrieval_ms_per_batch": 1.2,
        "compensation_ms_per_batch": 3.0,
        "groups_per_batch": 2.1,
        "retrieval_compensation_share_of_encode": 0.2049,
    }
    result = {
        "levels": [1, 4],
        "duration_s": 15.0,
        "p99_budget_ms": 100.0,
        "memory_entries": 2000,
        "naive": [_level(1, 50.0, 25.0), _level(4, 60.0, 93.0)],
        "driftserve": [_level(1, 45.0, 28.0), {**_level(4, 125.0, 70.0), "stages": stages}],
        "capacity_rps": {"naive": 60.0, "driftserve": 125.0},
        "ratio": 125.0 / 60.0,
    }
    write_outputs(tmp_path, result)
    md = (tmp_path / "serve.md").read_text()
    assert "| 4 | 400 | 3.10 | 20.50 | 1.20 | 3.00 | 2.10 | 20.5% |" in md


def _proc(root, pid: int, cmdline: str, utime: int, stime: int) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    # A command name with spaces and parentheses: the fields are counted after the last ")".
    rest = ["S", "1", "1", "1", "0", "-1", "0", "10", "0", "0", "0", str(utime), str(stime), "0", "0"]
    (d / "stat").write_text(f"{pid} (ray::Serve (x) y) " + " ".join(rest) + "\n")
    (d / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")


def test_cpu_accounting_splits_the_machine_by_role_per_request(tmp_path):
    import os

    tick = os.sysconf("SC_CLK_TCK")
    before_dir, after_dir = tmp_path / "a", tmp_path / "b"
    procs = {
        11: "ray::ServeReplica:driftserve:driftserve",
        12: "ray::ServeReplica:naive:Naive",
        13: "ray::ProxyActor",
        14: "/usr/bin/redis-server 127.0.0.1:16379",
    }
    for pid, cmd in procs.items():
        _proc(before_dir, pid, cmd, tick, 0)
    (before_dir / "self").mkdir()  # not a pid: skipped
    # After the level: Ray retitled the replica by the method it runs; pid 99 is the load generator.
    _proc(after_dir, 11, "ray::ServeReplica:driftserve:driftserve.check_health", 3 * tick, tick)
    _proc(after_dir, 12, procs[12], tick + tick // 2, 0)
    _proc(after_dir, 13, procs[13], 2 * tick, 0)
    _proc(after_dir, 14, procs[14], tick, tick // 2)
    _proc(after_dir, 99, "python bench", tick, 0)  # started during the level: all of its time counts
    before, after = process_cpu(before_dir), process_cpu(after_dir)
    assert before[11] == (procs[11] + " ", 1.0)
    report = cpu_report(before, after, "driftserve", requests=100, elapsed_s=2.0, own_pid=99)
    assert report["replica_ms_per_request"] == pytest.approx(30.0)  # 3 s of CPU over 100 requests
    assert report["other_replica_ms_per_request"] == pytest.approx(5.0)
    assert report["proxy_ms_per_request"] == pytest.approx(10.0)
    assert report["load_generator_ms_per_request"] == pytest.approx(10.0)
    assert report["rest_ms_per_request"] == pytest.approx(5.0)
    assert report["total_ms_per_request"] == pytest.approx(60.0)
    assert report["cores_busy"] == pytest.approx(3.0)
    naive = cpu_report(before, after, "naive", requests=100, elapsed_s=2.0, own_pid=99)
    assert naive["replica_ms_per_request"] == pytest.approx(5.0)
    assert naive["other_replica_ms_per_request"] == pytest.approx(30.0)
    assert process_cpu(tmp_path / "missing") == {}


def test_report_says_where_the_machines_cpu_went(tmp_path):
    cpu = {
        "replica_ms_per_request": 16.5,
        "other_replica_ms_per_request": 0.17,
        "proxy_ms_per_request": 6.93,
        "load_generator_ms_per_request": 2.0,
        "rest_ms_per_request": 3.1,
        "total_ms_per_request": 28.7,
        "cores_busy": 1.82,
    }
    result = {
        "levels": [8],
        "duration_s": 15.0,
        "p99_budget_ms": 100.0,
        "memory_entries": 2000,
        "naive": [_level(8, 26.0, 400.0)],
        "driftserve": [{**_level(8, 63.0, 190.0), "cpu": cpu}],
        "capacity_rps": {"naive": 0.0, "driftserve": 0.0},
        "ratio": float("inf"),
    }
    write_outputs(tmp_path, result)
    md = (tmp_path / "serve.md").read_text()
    assert "| driftserve | 8 | 16.50 | 6.93 | 2.00 | 0.17 | 3.10 | 28.70 | 1.82 |" in md
