"""The GPU benchmark's parts that run without a GPU: its report, and replica processes on the CPU."""

from __future__ import annotations

import pytest

from ops.bench import gpu


def _result() -> dict:
    return {
        "torch": "2.x",
        "device": "H100",
        "raw_forward_seq_per_s": 70_000.0,
        "raw_forward_seq_per_s_before_after": [[50_000.0, 52_000.0], [70_000.0, 69_000.0]],
        "serving_replicas": [
            {"replicas": 24, "in_flight": 1, "mps": False, "seq_per_s": 33_000.0},
            {"replicas": 24, "in_flight": 2, "mps": True, "seq_per_s": 36_000.0},
        ],
    }


def test_report_divides_by_the_highest_raw_rate_and_judges_each_configuration(tmp_path):
    gpu.write(_result(), tmp_path)
    md = (tmp_path / "gpu.md").read_text()
    assert "70,000 sequences/s, the highest of 50,000, 52,000 (before the replicas)" in md
    assert "| 24 replicas time-sliced | 33,000 | 47.1% | missed |" in md
    assert "| 24 replicas via MPS, 2 batches in flight each | 36,000 | 51.4% | met |" in md
    assert (tmp_path / "gpu.png").stat().st_size > 0
    assert (tmp_path / "gpu.json").exists()


def test_replica_processes_report_their_summed_rate(tiny_model_dir):
    run = gpu.serving_replicas(str(tiny_model_dir), 4, 50, replicas=2, seconds=0.5, device="cpu", in_flight=2)
    assert run["replicas"] == 2 and run["in_flight"] == 2 and not run["mps"]
    assert len(run["per_replica_seq_per_s"]) == 2 and all(r > 0 for r in run["per_replica_seq_per_s"])
    assert run["seq_per_s"] == pytest.approx(sum(run["per_replica_seq_per_s"]))


def test_a_replica_that_dies_fails_the_sweep_instead_of_hanging(tmp_path):
    with pytest.raises(RuntimeError, match="replica processes failed"):
        gpu.serving_replicas(str(tmp_path / "no-model"), 4, 50, replicas=2, seconds=0.5, device="cpu")


def test_bench_texts_are_seeded_words_of_the_models_vocabulary(tiny_model_dir):
    from tokenizers import Tokenizer

    vocab = set(Tokenizer.from_file(f"{tiny_model_dir}/tokenizer.json").get_vocab())
    texts = gpu._texts(str(tiny_model_dir), 50, words=7, seed=3)
    assert texts == gpu._texts(str(tiny_model_dir), 50, words=7, seed=3)
    assert texts != gpu._texts(str(tiny_model_dir), 50, words=7, seed=4)
    assert len(texts) == 50 and len(set(texts)) > 1
    words = [w for t in texts for w in t.split(" ")]
    assert len(words) == 50 * 7
    assert all(w in vocab and w.isalpha() and len(w) >= 4 for w in words)


def test_replica_configurations_parse_and_refuse_typos():
    assert gpu.parse_replicas("24") == (False, 24, 1, False)
    assert gpu.parse_replicas("mps:16x2") == (True, 16, 2, False)
    assert gpu.parse_replicas("mps:24/spin") == (True, 24, 1, True)
    assert gpu.parse_replicas("8x3/spin") == (False, 8, 3, True)
    for bad in ("24/block", "msp:24", "24x", "x2", ""):
        with pytest.raises(ValueError):
            gpu.parse_replicas(bad)


def test_spinning_replicas_are_named_in_the_report(tmp_path):
    r = _result()
    r["serving_replicas"].append(
        {"replicas": 24, "in_flight": 1, "mps": True, "spin": True, "seq_per_s": 35_000.0}
    )
    gpu.write(r, tmp_path)
    assert (
        "| 24 replicas via MPS, spinning waits | 35,000 | 50.0% | met |" in (tmp_path / "gpu.md").read_text()
    )


def test_a_learner_only_run_reports_the_learner_without_a_raw_forward(tmp_path):
    r = {
        "torch": "2.x",
        "device": "H100",
        "parts": ["learner"],
        "raw_lora_samples_per_s": 15_000.0,
        "learner": {"samples_per_s": 8_100.0, "steps": 300, "seconds": 9.5},
        "learner_over_raw": 0.54,
    }
    gpu.write(r, tmp_path)
    md = (tmp_path / "gpu.md").read_text()
    assert "8,100 samples/s against a raw LoRA step rate of 15,000: 54.0% (target 50%)" in md
    assert "Raw bf16 forward" not in md and "| serving |" not in md
    assert not (tmp_path / "gpu.png").exists()  # nothing to plot against


def test_parts_refuse_an_unknown_name(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["gpu", "--model-path", "m", "--out", "o", "--parts", "learners"])
    with pytest.raises(SystemExit):
        gpu.main()
    assert "invalid choice: 'learners'" in capsys.readouterr().err
