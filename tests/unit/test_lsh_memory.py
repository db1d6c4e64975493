"""The LSH forest memory beyond the shared contract: forgetting is immediate in every state of the index,
merges and rebuilds change nothing a lookup returns, the same index on every replica, near-duplicates
find their source, and the Predictor compensates through it."""

from __future__ import annotations

import numpy as np
import pytest

from serving.compensator import CompensationConfig
from serving.lsh_memory import LshMemory, hyperplanes
from streams.redis_store import Deletion, MemoryEntry
from tests.unit.test_memory_contract import clustered


def _entries(data: np.ndarray, start: int = 0, domain: str = "d") -> list[MemoryEntry]:
    return [MemoryEntry(f"e{start + i}", domain, f"e{start + i}", v, 0.0, "v") for i, v in enumerate(data)]


def _near(data: np.ndarray, rows: np.ndarray, cos: float, seed: int) -> np.ndarray:
    """Unit queries at cosine ``cos`` to the given stored keys."""
    rng = np.random.default_rng(seed)
    base = data[rows].astype(np.float64)
    noise = rng.standard_normal(base.shape)
    noise -= (noise * base).sum(axis=1, keepdims=True) * base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    q = cos * base + np.sqrt(1 - cos**2) * noise
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def test_a_forgotten_entry_is_never_returned_merged_or_not():
    data = clustered(600, 16, seed=21)
    mem = LshMemory(16, tables=8, window=16, candidates=64, exact_below=100, max_delta=50)
    mem.add(_entries(data[:500]))
    mem.add(_entries(data[500:530], start=500))  # under max_delta: appended, scanned exactly
    assert mem.indexed_domains() == ["d"]
    forest = mem._forests["d"]
    assert forest.indexed == 500
    gone = [3, 250, 499, 510, 529]  # merged rows and rows not merged yet
    mem.remove([f"e{i}" for i in gone])
    for i in gone:
        labels = mem.search("d", data[i], k=600)[1]  # its own key, and every candidate asked for
        assert f"e{i}" not in labels
        _, batch = mem.search_batch("d", np.stack([data[i], data[i]]), k=50)
        assert all(f"e{i}" not in row for row in batch)
    assert mem._forests["d"].dead == 3  # three were in the sorted arrays: tombstones until a rebuild
    for i in (4, 251, 511):
        labels = mem.search("d", data[i], k=1)[1]
        assert labels == [f"e{i}"]


def test_merges_index_appended_rows_without_changing_what_is_found():
    data = clustered(900, 16, seed=22)
    mem = LshMemory(16, tables=8, window=16, candidates=64, exact_below=200, max_delta=64)
    mem.add(_entries(data[:300]))
    for start in range(300, 900, 20):  # a live stream: merges every 64 appended rows
        mem.add(_entries(data[start : start + 20], start=start))
    forest = mem._forests["d"]
    assert forest.indexed >= 900 - 64 and forest.members == forest.indexed
    assert np.all(np.diff(forest.sorted_keys) >= 0)  # every table's run is still sorted
    for t in range(mem.tables):  # and holds every indexed row exactly once
        rows = forest.sorted_rows[t * forest.members : (t + 1) * forest.members]
        assert sorted(rows.tolist()) == list(range(forest.indexed))
    for i in range(0, 900, 37):
        sims, labels = mem.search("d", data[i], k=5)
        assert labels[0] == f"e{i}" and sims[0] == pytest.approx(1.0, abs=1e-5)


def test_many_deletions_rebuild_without_tombstones_and_small_domains_scan_exactly():
    data = clustered(1200, 8, seed=23)
    mem = LshMemory(8, tables=8, window=8, candidates=32, exact_below=400)
    mem.add(_entries(data))
    assert mem._forests["d"].members == 1200
    mem.remove([f"e{i}" for i in range(0, 1200, 2)])  # over half are tombstones -> rebuilt
    forest = mem._forests["d"]
    assert forest.members == 600 and forest.dead == 0
    for i in range(1, 1200, 100):
        labels = mem.search("d", data[i], k=8)[1]
        assert labels[0] == f"e{i}" and all(int(lab[1:]) % 2 == 1 for lab in labels)
    mem.remove([f"e{i}" for i in range(1, 1000, 2)])  # 100 left, under half the threshold
    assert mem.indexed_domains() == [] and len(mem.search("d", data[1199], k=500)[1]) == 100


def test_the_centre_follows_a_growing_domain():
    data = clustered(3000, 16, seed=24)
    mem = LshMemory(16, tables=8, window=8, candidates=32, exact_below=100, max_delta=10_000)
    mem.add(_entries(data[:100]))
    first = mem._forests["d"]
    mem.add(_entries(data[100:3000], start=100))  # 30x the entries the centre was taken from
    again = mem._forests["d"]
    assert again.centred_at == 3000 and again.members == 3000 and again.indexed == 3000
    centre = data.mean(axis=0)
    np.testing.assert_allclose(again.offsets, hyperplanes(16, 8, 16) @ centre, rtol=1e-4, atol=1e-5)
    assert not np.allclose(first.offsets, again.offsets)


def test_replicas_reading_the_same_log_agree():
    """The same log in the same batches (a restart) gives the same index and answers; in other batches
    the centre and the merge points may differ, but each finds every stored key first from its own key."""
    data = clustered(800, 16, seed=25)
    np.testing.assert_array_equal(hyperplanes(16, 8, 16), hyperplanes(16, 8, 16))
    a, b, c = (LshMemory(16, tables=8, exact_below=100, max_delta=40) for _ in range(3))
    log = [*_entries(data), *(Deletion(f"e{i}") for i in range(0, 800, 9))]
    for start in range(0, len(log), 77):
        a.apply(log[start : start + 77])
        b.apply(log[start : start + 77])
    c.apply(log)
    for q in clustered(20, 16, seed=26):
        sa, la = a.search("d", q, k=10)
        sb, lb = b.search("d", q, k=10)
        assert la == lb
        np.testing.assert_array_equal(sa, sb)
    for i in range(1, 800, 9):
        assert a.search("d", data[i], k=1)[1] == c.search("d", data[i], k=1)[1] == [f"e{i}"]


def test_near_duplicates_find_their_source_and_neighbours_at_scale():
    """20k clustered keys: a query at cosine 0.95 to a stored key returns that key first, and the top 10
    mostly matches exact search (the default configuration, the path that serves large domains)."""
    dim, n = 64, 20_000
    data = clustered(n, dim, seed=27, clusters=200)
    mem = LshMemory(dim)
    mem.add(_entries(data))
    assert mem.indexed_domains() == ["d"]
    rows = np.random.default_rng(28).choice(n, 100, replace=False)
    queries = _near(data, rows, 0.95, seed=29)
    first, recall = 0, []
    for row, q in zip(rows, queries, strict=True):
        sims, labels = mem.search("d", q, k=10)
        first += labels[0] == f"e{row}"
        truth = np.argsort(-(data @ q))[:10]
        recall.append(len({f"e{i}" for i in truth} & set(labels)) / 10)
        np.testing.assert_allclose(sims, data[[int(x[1:]) for x in labels]] @ q, rtol=1e-5, atol=1e-6)
    assert first >= 97 and np.mean(recall) >= 0.8, (first, np.mean(recall))


def test_the_predictor_compensates_and_forgets_through_the_forest(tiny_encoder):
    from serving.predictor import Predictor

    memory = LshMemory(tiny_encoder.dim, tables=8, window=8, candidates=16, exact_below=1, max_delta=1)
    predictor = Predictor(tiny_encoder, memory, CompensationConfig())
    rows = [("the cat sat", "cats"), ("stock prices fell", "finance"), ("rain again today", "weather")]
    keys = predictor.embed([t for t, _ in rows])
    memory.add([MemoryEntry(f"r{i}", "d", lab, keys[i], 0.0, "v") for i, (_, lab) in enumerate(rows)])
    text = "a brand new topic about volcanoes"
    (before,) = predictor.predict([text], ["d"])
    assert before.label in {"cats", "finance", "weather"}
    memory.add([MemoryEntry("r9", "d", "geology", predictor.embed([text])[0], 0.0, "v")])
    assert memory.indexed_domains() == ["d"] and memory._forests["d"].indexed == 4  # merged at once
    (after,) = predictor.predict([text], ["d"])
    assert after.label == "geology" and after.compensated
    memory.apply([Deletion("r9")])
    (forgotten,) = predictor.predict([text], ["d"])
    assert forgotten.label in {"cats", "finance", "weather"}


def test_constructor_checks_its_arguments():
    with pytest.raises(ValueError, match="multiple of 4"):
        LshMemory(8, tables=6)
    with pytest.raises(ValueError, match="window"):
        LshMemory(8, window=0)
    with pytest.raises(ValueError, match="exact_below"):
        LshMemory(8, exact_below=0)
    with pytest.raises(ValueError, match="dim"):
        LshMemory(0)
    assert LshMemory(8, candidates=100).exact_below == 100  # default: a domain no larger than one lookup
