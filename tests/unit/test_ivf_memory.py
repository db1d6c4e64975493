"""The inverted-file memory beyond the shared contract: forgetting is immediate in every state of the
index, merges and rebuilds keep every live row in exactly one list, retraining follows a growing domain,
replicas reading the same log agree, near-duplicates find their source, a lookup's pool stays bounded,
and the Predictor compensates through it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serving.compensator import CompensationConfig
from serving.ivf_memory import IvfMemory, hyperplanes
from streams.redis_store import Deletion, MemoryEntry
from tests.conftest import wait_for
from tests.unit.test_memory_contract import clustered, write_while_the_first_build_waits


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


def _check_lists(mem: IvfMemory, domain: str = "d") -> None:
    """Every indexed row sits in exactly one list, the list of its nearest centroid, with its own code."""
    index = mem._indexes[domain]
    d = mem._domains[domain]
    assert np.all(np.diff(index.sorted_lists) >= 0) and index.starts[-1] == index.members
    assert np.unique(index.sorted_rows).size == index.members
    keys = d.keys[index.sorted_rows]
    np.testing.assert_array_equal(index.sorted_lists, np.argmax(keys @ index.centroids.T, axis=1))
    np.testing.assert_array_equal(index.sorted_codes, mem._codes(keys, index.offsets))


def test_a_forgotten_entry_is_never_returned_merged_or_not():
    data = clustered(600, 16, seed=21)
    mem = IvfMemory(16, pool=120, candidates=40, exact_below=100, max_delta=50)
    mem.add(_entries(data[:500]))
    mem.add(_entries(data[500:530], start=500))  # under max_delta: appended, scanned exactly
    assert mem.wait_indexed(timeout=60)
    assert mem.indexed_domains() == ["d"] and mem._indexes["d"].indexed == 500
    gone = [3, 250, 499, 510, 529]  # merged rows and rows not merged yet
    mem.remove([f"e{i}" for i in gone])
    for i in gone:
        labels = mem.search("d", data[i], k=600)[1]  # its own key, and every candidate asked for
        assert f"e{i}" not in labels
        _, batch = mem.search_batch("d", np.stack([data[i], data[i]]), k=50)
        assert all(f"e{i}" not in row for row in batch)
    assert mem._indexes["d"].dead == 3  # three were in the lists: tombstones until a rebuild
    for i in (4, 251, 511):
        assert mem.search("d", data[i], k=1)[1] == [f"e{i}"]


def test_merges_put_appended_rows_in_their_lists_without_changing_what_is_found():
    data = clustered(900, 16, seed=22)
    # Built inline, so when the lists are retrained does not depend on a build thread's timing.
    mem = IvfMemory(16, pool=150, candidates=40, exact_below=200, max_delta=64, background=False)
    mem.add(_entries(data[:300]))
    for start in range(300, 900, 20):  # a live stream: merges every 64 appended rows, retrains at 600
        mem.add(_entries(data[start : start + 20], start=start))
    index = mem._indexes["d"]
    assert index.trained_at == 600 and index.indexed >= 900 - 64 and index.members == index.indexed
    _check_lists(mem)
    for i in range(0, 900, 37):
        sims, labels = mem.search("d", data[i], k=5)
        assert labels[0] == f"e{i}" and sims[0] == pytest.approx(1.0, abs=1e-5)


def test_many_deletions_rebuild_without_tombstones_and_small_domains_scan_exactly():
    data = clustered(1200, 8, seed=23)
    mem = IvfMemory(8, pool=100, candidates=32, exact_below=400)
    mem.add(_entries(data))
    assert mem.wait_indexed(timeout=60) and mem._indexes["d"].members == 1200
    mem.remove([f"e{i}" for i in range(0, 1200, 2)])  # half are tombstones -> rebuilt
    assert mem.wait_indexed(timeout=60)
    index = mem._indexes["d"]
    assert index.members == 600 and index.dead == 0
    _check_lists(mem)
    for i in range(1, 1200, 100):
        labels = mem.search("d", data[i], k=8)[1]
        assert labels[0] == f"e{i}" and all(int(lab[1:]) % 2 == 1 for lab in labels)
    mem.remove([f"e{i}" for i in range(1, 1000, 2)])  # 100 left, under half the threshold
    assert mem.indexed_domains() == [] and len(mem.search("d", data[1199], k=500)[1]) == 100


def test_lists_are_retrained_as_the_domain_grows():
    data = clustered(3000, 16, seed=24)
    mem = IvfMemory(16, pool=200, candidates=40, exact_below=100, max_delta=10_000)
    mem.add(_entries(data[:100]))
    assert mem.wait_indexed(timeout=60) and mem._indexes["d"].centroids.shape[0] == 10  # sqrt(entries)
    mem.add(_entries(data[100:3000], start=100))  # 30x the entries the lists were drawn from
    assert mem.wait_indexed(timeout=60)
    index = mem._indexes["d"]
    assert index.trained_at == 3000 and index.members == 3000 and index.centroids.shape[0] == 55
    np.testing.assert_allclose(np.linalg.norm(index.centroids, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(index.offsets, hyperplanes(16) @ data.mean(axis=0), rtol=1e-4, atol=1e-5)
    _check_lists(mem)


def test_a_lookup_reads_a_bounded_pool():
    """Lists are probed nearest first until the pool is full: the rows a lookup reads do not grow with
    the domain (observed through the Hamming pre-ranking's input)."""
    data = clustered(4000, 16, seed=30)
    mem = IvfMemory(16, pool=300, candidates=50)
    mem.add(_entries(data))
    assert mem.wait_indexed(timeout=60)
    index = mem._indexes["d"]
    sizes = np.diff(index.starts)
    seen: list[int] = []
    original = np.bitwise_count

    def counting(x, *args, **kwargs):
        seen.append(x.shape[0])
        return original(x, *args, **kwargs)

    np.bitwise_count = counting  # type: ignore[assignment]
    try:
        for q in clustered(20, 16, seed=31):
            mem.search("d", q, k=10)
    finally:
        np.bitwise_count = original  # type: ignore[assignment]
    assert len(seen) == 20 and max(seen) < 300 + sizes.max()  # the list that fills the pool ends it


def test_replicas_reading_the_same_log_agree():
    """Built inline, the same log in the same batches (a restart) gives the same index and answers; in
    other batches the lists may differ, but each finds every stored key first from its own key. (Built in
    the background, when a build is swapped in also decides which rows it merges: the pools may differ
    as in other batches, and the re-ranking stays exact.)"""
    data = clustered(800, 16, seed=25)
    np.testing.assert_array_equal(hyperplanes(16), hyperplanes(16))
    a, b, c = (
        IvfMemory(16, pool=150, candidates=40, exact_below=100, max_delta=40, background=False)
        for _ in range(3)
    )
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
    """20k clustered keys with the default configuration (the path that serves large domains): a query
    at cosine 0.95 to a stored key returns that key first, and the top 10 mostly matches exact search."""
    dim, n = 64, 20_000
    data = clustered(n, dim, seed=27, clusters=200)
    mem = IvfMemory(dim)
    mem.add(_entries(data))
    assert mem.wait_indexed(timeout=120) and mem.indexed_domains() == ["d"]
    rows = np.random.default_rng(28).choice(n, 100, replace=False)
    queries = _near(data, rows, 0.95, seed=29)
    first, recall = 0, []
    for row, q in zip(rows, queries, strict=True):
        sims, labels = mem.search("d", q, k=10)
        first += labels[0] == f"e{row}"
        truth = np.argsort(-(data @ q))[:10]
        recall.append(len({f"e{i}" for i in truth} & set(labels)) / 10)
        np.testing.assert_allclose(sims, data[[int(x[1:]) for x in labels]] @ q, rtol=1e-5, atol=1e-6)
    assert first >= 97 and np.mean(recall) >= 0.9, (first, np.mean(recall))


def test_the_predictor_compensates_and_forgets_through_the_index(tiny_encoder):
    from serving.predictor import Predictor

    memory = IvfMemory(tiny_encoder.dim, pool=2, candidates=2, exact_below=1, max_delta=1)
    predictor = Predictor(tiny_encoder, memory, CompensationConfig())
    rows = [("the cat sat", "cats"), ("stock prices fell", "finance"), ("rain again today", "weather")]
    keys = predictor.embed([t for t, _ in rows])
    memory.add([MemoryEntry(f"r{i}", "d", lab, keys[i], 0.0, "v") for i, (_, lab) in enumerate(rows)])
    text = "a brand new topic about volcanoes"
    (before,) = predictor.predict([text], ["d"])
    assert before.label in {"cats", "finance", "weather"}
    memory.add([MemoryEntry("r9", "d", "geology", predictor.embed([text])[0], 0.0, "v")])
    assert memory.wait_indexed(timeout=60)
    assert memory.indexed_domains() == ["d"] and memory._indexes["d"].indexed == 4  # merged at once
    (after,) = predictor.predict([text], ["d"])
    assert after.label == "geology" and after.compensated
    memory.apply([Deletion("r9")])
    (forgotten,) = predictor.predict([text], ["d"])
    assert forgotten.label in {"cats", "finance", "weather"}


class _GatedIvf(IvfMemory):
    """Builds wait for ``gate`` before training their lists (inline merges do not train)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.builds: list[str] = []

    def _kmeans(self, *args, **kwargs):
        self.builds.append(threading.current_thread().name)
        assert self.gate.wait(60)
        return super()._kmeans(*args, **kwargs)


def test_builds_run_in_the_background_and_the_swap_misses_nothing():
    """A build takes 40 s at 1M entries: the writer must not wait for it (feedback-to-fix). Meanwhile the
    domain is scanned exactly (first build) or served and merged into by its current index (a retraining);
    at the swap, rows forgotten since the snapshot are the new index's tombstones and rows appended since
    are merged."""
    data = clustered(1000, 8, seed=40)
    mem = _GatedIvf(8, pool=120, candidates=40, exact_below=300, max_delta=50)
    forgotten = write_while_the_first_build_waits(mem, data, lambda: mem.builds == ["ivf-build-d"])

    mem.gate.set()
    assert mem.wait_indexed(timeout=60) and mem.indexed_domains() == ["d"]
    index = mem._indexes["d"]
    # the build's 300 rows, 100 of them forgotten while it ran; the 298 rows appended since, merged
    assert (index.trained_at, index.indexed, index.members, index.dead) == (300, 600, 598, 100)
    _check_lists(mem)

    mem.gate.clear()  # the domain doubles: its lists are retrained in the background
    assert mem.add(_entries(data[600:1000], start=600)) == 400
    wait_for(lambda: mem.builds == ["ivf-build-d"] * 2, 30, 0.01, "the retraining at the gate")
    serving = mem._indexes["d"]
    assert serving.trained_at == 300 and serving.indexed == 1000  # the old lists serve, merged into
    mem.remove(["e700", "e5"])
    mem.gate.set()
    assert mem.wait_indexed(timeout=60)
    index = mem._indexes["d"]
    assert index.trained_at == 1000 - 102 and index.members == 898 and index.dead == 2
    _check_lists(mem)
    for i in range(1, 1000, 7):
        labels = mem.search("d", data[i], k=8)[1]
        assert not {*forgotten, "e700", "e5"} & set(labels)
        if f"e{i}" not in forgotten:
            assert labels[0] == f"e{i}"


def test_a_domain_that_doubled_during_its_build_is_retrained_from_the_swap():
    """The swap catches up with the rows appended meanwhile; when they double the domain, the next build
    starts there (not skipped as a duplicate of the build that is just ending)."""
    data = clustered(700, 8, seed=41)
    mem = _GatedIvf(8, pool=120, candidates=40, exact_below=300, max_delta=50)
    mem.add(_entries(data[:300]))
    wait_for(lambda: mem.builds == ["ivf-build-d"], 30, 0.01, "the first build at the gate")
    mem.add(_entries(data[300:700], start=300))  # 700 live: more than twice the 300 being built on
    mem.gate.set()
    assert mem.wait_indexed(timeout=60)
    index = mem._indexes["d"]
    assert mem.builds == ["ivf-build-d"] * 2 and index.trained_at == 700 and index.members == 700
    _check_lists(mem)


def test_constructor_checks_its_arguments():
    with pytest.raises(ValueError, match="pool"):
        IvfMemory(8, pool=0)
    with pytest.raises(ValueError, match="exact_below"):
        IvfMemory(8, exact_below=0)
    with pytest.raises(ValueError, match="dim"):
        IvfMemory(0)
    assert IvfMemory(8, candidates=100).exact_below == 100  # default: a domain no larger than one lookup
