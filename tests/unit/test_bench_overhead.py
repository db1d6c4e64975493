"""bench overhead: the serving path's cost beside the model's, on a small memory and a tiny real model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ops.bench import overhead


def test_corpus_separates_domains_and_classes():
    rows = overhead.corpus(domains=3, per_domain=16, seed=0)
    assert len(rows) == 48
    assert {d for _, d, _ in rows} == {"dom0", "dom1", "dom2"}
    assert len({lab for _, _, lab in rows}) == 3 * overhead.CLASSES
    words = {d: {w for t, dd, _ in rows if dd == d for w in t.split()} for d in ("dom0", "dom1")}
    assert not words["dom0"] & words["dom1"]  # each domain has its own vocabulary


def test_noisy_copies_stay_near_their_source():
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((5, 384)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    copies = overhead._noisy(keys, 4, rng)
    assert copies.shape == (20, 384)
    np.testing.assert_allclose(np.linalg.norm(copies, axis=1), 1.0, rtol=1e-5)
    cos = np.einsum("nd,nd->n", copies, np.repeat(keys, 4, axis=0))
    assert cos.min() > 0.8 and cos.max() < 0.97


def test_run_times_the_real_predictor_and_reports_every_cell(tmp_path, tiny_model_dir):
    result = overhead.run(
        tmp_path,
        entries=900,
        domains=3,
        base_texts=300,
        queries=24,
        kinds=("exact", "ivf"),
        batch_sizes=(1, 4),
        seconds=0.2,
        runtime="torch",
        model_path=tiny_model_dir,
        adapter_steps=2,
    )
    assert set(result["kinds"]) == {"exact", "ivf"}
    for kind in ("exact", "ivf"):
        assert result["kinds"][kind]["entries_held"] == 900
        modes = result["kinds"][kind]["modes"]
        assert set(modes) == {"memory", "adapter"}
        for mode, cells in modes.items():
            for b in ("1", "4"):
                cell = cells[b]
                assert cell["rounds"] >= 20 and cell["model_p50_ms"] > 0 and cell["rest_p50_ms"] > 0
                assert cell["overhead_pct"] == pytest.approx(100 * cell["rest_p50_ms"] / cell["model_p50_ms"])
                assert cell["routed_share"] > 0.5  # requests name no domain: retrieval routes them
                assert cell["compensated_share"] > 0  # near-duplicates are stored: compensation fires
                # every routed request is answered by its domain's adapter once they are active
                assert cell["adapter_share"] == (cell["routed_share"] if mode == "adapter" else 0.0)
        # the adapter's forward runs inside predict and is counted as model time, not overhead
        assert modes["adapter"]["4"]["model_p50_ms"] > modes["memory"]["4"]["model_p50_ms"]
    worst = result["worst_overhead_pct"]["exact"]["memory"]
    assert worst == max(c["overhead_pct"] for c in result["kinds"]["exact"]["modes"]["memory"].values())
    saved = json.loads((tmp_path / "overhead.json").read_text())
    assert (
        saved["entries"] == 900
        and 5 < saved["tokens_per_request"]["mean"] <= saved["tokens_per_request"]["max"]
    )
    assert "| ivf | adapter | 4 |" in (tmp_path / "overhead.md").read_text()
    assert (tmp_path / "overhead.png").stat().st_size > 0


def test_run_rejects_a_memory_smaller_than_its_sources(tmp_path):
    with pytest.raises(ValueError, match="base_texts"):
        overhead.run(tmp_path, entries=10, base_texts=20)
