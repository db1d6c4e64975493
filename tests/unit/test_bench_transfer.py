"""``bench transfer`` on tiny real models: both systems serve with the calibration their artifacts carry
(the teacher fitted as the learner fits a candidate, the student by the migration), and a slow migration
can be prepared once and replayed later from its artifacts."""

from __future__ import annotations

import gzip
import json
import tempfile
from dataclasses import replace

import pytest

from learners.buffer import Example
from learners.trainer import TrainConfig
from learners.transfer import TransferConfig
from ops.bench import transfer

TEXTS = [
    "good food and great service",
    "bad food and awful service",
    "lovely taste really great",
    "terrible taste really awful",
    "great value would buy again",
    "awful value never again",
]


@pytest.fixture(scope="module")
def mpnet_dir(tiny_mpnet_dir) -> str:
    return tiny_mpnet_dir


@pytest.fixture()
def stream(tmp_path):
    path = tmp_path / "s.jsonl.gz"
    rows = [
        {
            "id": f"e{i}",
            "ts": float(i),
            "text": TEXTS[i % 6],
            "label": ["pos", "neg"][i % 2],
            "domain": "food",
        }
        for i in range(40)
    ]
    with gzip.open(path, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _bench(tiny_model_dir: str, mpnet_dir: str) -> transfer.TransferBench:
    return transfer.TransferBench(
        history=30,
        evaluate=10,
        buffer_capacity=30,
        window=5,
        batch=4,
        max_length=32,
        old_model=tiny_model_dir,
        new_model=mpnet_dir,
        same_arch_model=None,
        retrain_reference=False,
        teacher=TrainConfig(epochs=2, batch_size=8, max_steps=8),
        transfer=TransferConfig(
            synthetic_per_example=1, train=TrainConfig(epochs=1, batch_size=8, max_steps=4)
        ),
    )


def test_split_holds_out_the_newest_share_by_time():
    rows = [Example(f"e{i}", "t", "a", float(i)) for i in (3, 0, 4, 1, 2, 9, 8, 7, 6, 5)]
    train, hold = transfer.split(rows, 0.2)
    assert [e.ts for e in train] == [0, 1, 2, 3, 4, 5, 6, 7] and [e.ts for e in hold] == [8, 9]
    assert transfer.split(rows[:3], 0.2) == (sorted(rows[:3], key=lambda e: e.ts), [])


def test_memory_gains_compare_each_memory_variant_with_its_systems_no_memory():
    rows = {
        "old/memory": {"windows": [0.7, 0.6]},
        "old/no_memory": {"windows": [0.6, 0.65]},
        "new/rekeyed_memory": {"windows": [0.8, 0.8]},
        "new/empty_memory": {"windows": [0.7, 0.7]},
        "new/no_memory": {"windows": [0.7, 0.7]},
        "ref/rekeyed_memory": {"windows": [0.5, 0.5]},  # no memory-less twin: nothing to compare
    }
    gains = transfer.memory_gains(rows)
    assert set(gains) == {"old/memory", "new/rekeyed_memory"}
    assert gains["old/memory"] == pytest.approx([0.1, -0.05])
    assert gains["new/rekeyed_memory"] == pytest.approx([0.1, 0.1])


def test_uncalibrated_drops_the_fitted_values_under_another_version(tiny_encoder, tmp_path):
    from learners import artifacts
    from learners.evaluation import with_metrics
    from learners.trainer import train_adapter

    cfg = TrainConfig(epochs=1, batch_size=8, max_steps=2)
    trained = train_adapter(tiny_encoder, TEXTS, ["pos", "neg"] * 3, cfg)
    art = with_metrics(
        artifacts.publish_trained(tmp_path, tiny_encoder, "food", trained),
        memory_weight=0.1,
        compensation_sim_low=0.8,
        holdout_accuracy=0.9,
    )
    plain = transfer.uncalibrated(art)
    assert plain.manifest.metrics == {"holdout_accuracy": 0.9}  # the deployment's defaults apply
    assert plain.manifest.version == f"{art.manifest.version}-defaults"
    assert plain.adapter_dir == art.adapter_dir and plain.head is art.head


def test_both_systems_serve_with_their_fitted_calibration(
    tiny_model_dir, mpnet_dir, stream, tmp_path, monkeypatch
):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = transfer.run(stream, tmp_path / "run", _bench(tiny_model_dir, mpnet_dir))
    assert list(scratch.iterdir()) == []  # the run's scratch (buffer, unreported artifacts) is removed
    cal = result["serving_calibration"]
    assert 0.0 <= cal["old"]["memory_weight"] <= 1.0
    assert 0.0 <= cal["new_transfer"]["memory_weight"] <= 1.0
    assert result["buffered_examples"] == 30
    assert result["transfers"]["new_transfer"]["memory_weight"] == cal["new_transfer"]["memory_weight"]
    assert set(result["results"]) == {
        "old/memory",
        "old/memory@defaults",
        "old/no_memory",
        "new_transfer/rekeyed_memory",
        "new_transfer/rekeyed_memory@defaults",
        "new_transfer/empty_memory",
        "new_transfer/no_memory",
    }
    assert all(len(r["windows"]) == 2 for r in result["results"].values())
    md = (tmp_path / "run" / "transfer.md").read_text()
    assert "Serving calibration" in md and "Memory gain per window" in md


def test_a_prepared_migration_replays_from_its_artifacts(tiny_model_dir, mpnet_dir, stream, tmp_path):
    cfg = _bench(tiny_model_dir, mpnet_dir)
    prepared = transfer.run(stream, tmp_path / "prep", replace(cfg, evaluate=0))
    assert prepared["results"] == {} and "old_memory_keys_s" not in prepared["timings"]
    arts = prepared["artifacts"]
    replayed = transfer.run(
        stream,
        tmp_path / "replay",
        replace(cfg, teacher_artifact=arts["teacher"], student_artifact=arts["student"]),
    )
    assert replayed["artifacts"]["student"] == arts["student"]
    # The teacher is refitted the same way; the student carries what the migration fitted.
    assert replayed["serving_calibration"] == prepared["serving_calibration"]
    assert len(replayed["results"]["new_transfer/rekeyed_memory"]["windows"]) == 2
