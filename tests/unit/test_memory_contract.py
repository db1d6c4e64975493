"""Checks that every error-memory implementation must pass (river's shared checks): a new memory kind
gets the whole suite by adding itself to ``KINDS``.

``ann-indexed`` is ``AnnMemory`` with an index from the first entry, so the approximate path (HNSW
candidates, exact re-scoring, tombstones, rows not yet indexed) runs on the small cases as well;
``ann`` is the default configuration, which scans small domains exactly. ``ivf-indexed`` is
``IvfMemory`` with lists from the first entry and merges every few rows, so its approximate path (lists,
Hamming pre-ranking, exact re-ranking, tombstones, rows not yet merged) runs on the small cases too;
``ivf`` is its default configuration.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from serving.ann_memory import AnnMemory
from serving.ivf_memory import IvfMemory
from serving.memory import InProcessMemory, make_memory
from streams.redis_store import Deletion, MemoryEntry
from tests.conftest import wait_for

KINDS = ["exact", "ann", "ann-indexed", "ivf", "ivf-indexed"]


def _memory(kind: str, dim: int, exact_below: int | None = None) -> InProcessMemory:
    if kind == "ann-indexed":  # graphs built inline: every search after the first add takes the graph path
        return AnnMemory(dim, exact_below=exact_below or 1, background=False)
    if kind == "ann" and exact_below is not None:
        return AnnMemory(dim, exact_below=exact_below)
    if kind == "ivf-indexed":  # built inline, as above
        return IvfMemory(
            dim, exact_below=exact_below or 1, pool=200, candidates=64, max_delta=7, background=False
        )
    if kind == "ivf" and exact_below is not None:
        return IvfMemory(dim, exact_below=exact_below)
    return make_memory(kind, dim)


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def _entry(i: int | str, vec, label: str, domain: str = "d") -> MemoryEntry:
    return MemoryEntry(f"e{i}", domain, label, _unit(vec), 0.0, "v")


def clustered(n: int, dim: int, seed: int, clusters: int = 50) -> np.ndarray:
    """Unit vectors around shared cluster centres with a low-dimensional structure, like sentence
    embeddings (neighbour cosines of ~0.7-0.9), rather than isotropic noise."""
    latent = min(16, dim)
    basis = np.random.default_rng(1).standard_normal((latent, dim)).astype(np.float32)
    centres = np.random.default_rng(2).standard_normal((clusters, latent)).astype(np.float32)
    rng = np.random.default_rng(seed)
    z = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, latent), dtype=np.float32)
    x = z @ basis / np.sqrt(latent) + 0.15 * rng.standard_normal((n, dim), dtype=np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(params=KINDS)
def kind(request) -> str:
    return request.param


def test_make_memory_rejects_unknown_kinds():
    with pytest.raises(ValueError, match="'exact', 'ann' or 'ivf'"):
        make_memory("faiss", 4)
    assert type(make_memory("exact", 4)) is InProcessMemory
    assert isinstance(make_memory("ann", 4), AnnMemory)
    assert isinstance(make_memory("ivf", 4), IvfMemory)


def test_search_returns_nearest_first_within_domain(kind):
    mem = _memory(kind, dim=2)
    mem.add([_entry(1, [1, 0], "a"), _entry(2, [0, 1], "b"), _entry(3, [1, 0.1], "a", domain="other")])
    sims, labels = mem.search("d", _unit([1, 0.2]), k=5)
    assert labels == ["a", "b"]
    assert sims.dtype == np.float32 and sims[0] > sims[1]
    np.testing.assert_allclose(
        sims, [_unit([1, 0.2]) @ _unit([1, 0]), _unit([1, 0.2]) @ _unit([0, 1])], rtol=1e-6
    )
    assert mem.search("missing", _unit([1, 0]), k=3)[1] == []
    assert mem.domains() == ["d", "other"] and mem.labels("other") == ["a"]


def test_search_order_and_exact_similarities_on_random_data(kind):
    rng = np.random.default_rng(0)
    data = clustered(400, 16, seed=3)
    mem = _memory(kind, dim=16)
    assert mem.add([MemoryEntry(f"e{i}", "d", f"l{i}", v, 0.0, "v") for i, v in enumerate(data)]) == 400
    recall = []
    for _ in range(20):
        q = _unit(rng.normal(size=16))
        sims, labels = mem.search("d", q, k=10)
        assert len(labels) == 10 and np.all(np.diff(sims) <= 0)
        rows = [int(lab[1:]) for lab in labels]
        np.testing.assert_allclose(sims, data[rows] @ q, rtol=1e-5, atol=1e-6)  # exact cosines
        truth = np.argsort(-(data @ q))[:10]
        recall.append(len(set(rows) & set(truth.tolist())) / 10)
    # Exact kinds find every true neighbour; an approximate index (HNSW, built by several threads, so not
    # bit-for-bit repeatable) must keep recall@10 high on average and never lose more than two of ten.
    assert np.mean(recall) >= 0.95 and min(recall) >= 0.8, recall
    if kind == "exact":
        assert min(recall) == 1.0


def test_k_larger_than_domain_returns_every_live_entry(kind):
    mem = _memory(kind, dim=3)
    mem.add([_entry(i, [1, i, 0.5], "x") for i in range(5)])
    mem.remove(["e2"])
    sims, labels = mem.search("d", _unit([1, 1, 1]), k=50)
    assert len(sims) == len(labels) == 4


def test_domains_are_isolated(kind):
    mem = _memory(kind, dim=2)
    mem.add([_entry(1, [1, 0], "a", domain="x"), _entry(2, [1, 0.01], "b", domain="y")])
    assert mem.search("x", _unit([1, 0]), k=5)[1] == ["a"]
    assert mem.search("y", _unit([1, 0]), k=5)[1] == ["b"]
    assert mem.class_means("x")[0] == ["a"] and mem.class_means("y")[0] == ["b"]


def test_domain_centroids_are_the_mean_live_key_of_each_domain(kind):
    mem = _memory(kind, dim=2)
    mem.add([_entry(1, [1, 0], "a", domain="x"), _entry(2, [0, 1], "b", domain="x")])
    mem.add([_entry(3, [1, 1], "c", domain="y"), _entry(4, [-1, 0], "c", domain="gone")])
    mem.remove(["e4"])
    names, cents = mem.domain_centroids()
    assert names == ["x", "y"]
    np.testing.assert_allclose(cents, [_unit([1, 1]), _unit([1, 1])], atol=1e-6)


def test_duplicate_event_ids_and_wrong_dims_are_ignored(kind):
    mem = _memory(kind, dim=2)
    assert mem.add([_entry(1, [1, 0], "a"), _entry(1, [0, 1], "b")]) == 1
    assert mem.add([MemoryEntry("e9", "d", "a", np.ones(3, dtype=np.float32), 0.0, "v")]) == 0
    assert len(mem) == 1 and mem.search("d", _unit([0, 1]), k=5)[1] == ["a"]


def test_deletions_are_masked_and_a_deleted_id_stays_deleted(kind):
    mem = _memory(kind, dim=2)
    mem.apply([_entry(1, [1, 0], "a"), _entry(2, [0, 1], "b"), _entry(3, [1, 0.2], "a"), Deletion("e1")])
    assert len(mem) == 2 and not mem.contains("e1") and mem.contains("e3")
    sims, labels = mem.search("d", _unit([1, 0]), k=10)
    assert labels == ["a", "b"] and len(sims) == 2
    np.testing.assert_allclose(sims[0], _unit([1, 0]) @ _unit([1, 0.2]), rtol=1e-6)
    assert mem.remove(["e2", "e2", "nope"]) == 1
    assert mem.class_means("d")[0] == ["a"] and mem.labels("d") == ["a"]
    assert mem.add([_entry(2, [0, 1], "b")]) == 0  # a redelivered deleted id is not re-added
    assert mem.add([_entry(1, [1, 0], "a")]) == 0
    assert mem.search("d", _unit([0, 1]), k=10)[1] == ["a"]
    mem.remove(["e3"])
    assert mem.search("d", _unit([1, 0]), k=10)[1] == [] and len(mem) == 0


def test_class_means_follow_adds_and_removes(kind):
    rng = np.random.default_rng(1)
    vecs = [_unit(rng.normal(size=6)) for _ in range(300)]
    mem = _memory(kind, dim=6)
    mem.add([MemoryEntry(f"e{i}", "d", str(i % 3), v, 0.0, "v") for i, v in enumerate(vecs)])
    gone = {f"e{i}" for i in range(0, 300, 4)} | {f"e{i}" for i in range(2, 300, 3)}  # all of class "2"
    mem.apply([Deletion(e) for e in sorted(gone)])
    labels, means = mem.class_means("d")
    assert labels == ["0", "1"]
    for lab, mean in zip(labels, means, strict=True):
        rows = [i for i in range(300) if str(i % 3) == lab and f"e{i}" not in gone]
        expect = np.mean([vecs[i] for i in rows], axis=0)
        np.testing.assert_allclose(mean, expect / np.linalg.norm(expect), atol=1e-5)
    assert len(mem) == 300 - len(gone)


def test_cached_class_means_and_centroids_follow_every_change(kind):
    """Both are cached per change of the memory (every request reads them): a read between changes must
    never see the state before the change, and no caller can write into the cache."""
    mem = _memory(kind, dim=2)
    mem.add([_entry(1, [1, 0], "a", domain="x"), _entry(2, [0, 1], "b", domain="y")])
    labels, means = mem.class_means("x")
    names, cents = mem.domain_centroids()
    assert (labels, names) == (["a"], ["x", "y"])
    assert mem.class_means("x")[1] is means  # unchanged memory: the cached array
    with pytest.raises(ValueError):
        means[0, 0] = 5.0
    with pytest.raises(ValueError):
        cents[0, 0] = 5.0
    labels.append("mutated")  # the returned list is the caller's own
    assert mem.class_means("x")[0] == ["a"]
    mem.add([_entry(3, [0, 1], "a", domain="x"), _entry(4, [1, 1], "c", domain="x")])
    labels, means = mem.class_means("x")
    assert labels == ["a", "c"]
    np.testing.assert_allclose(means, [_unit([1, 1]), _unit([1, 1])], atol=1e-6)
    np.testing.assert_allclose(mem.domain_centroids()[1][0], _unit([2, 2]), atol=1e-6)
    mem.remove(["e4"])
    assert mem.class_means("x")[0] == ["a"]
    mem.remove(["e2"])
    names, cents = mem.domain_centroids()
    assert names == ["x"] and cents.shape == (1, 2)
    np.testing.assert_allclose(cents[0], _unit([1, 1]), atol=1e-6)
    mem.remove(["e1", "e3"])
    assert mem.domain_centroids()[0] == [] and mem.class_means("x")[0] == []


def test_batch_search_matches_single_search(kind):
    rng = np.random.default_rng(2)
    mem = _memory(kind, dim=8)
    mem.add([_entry(i, rng.normal(size=8), str(i % 4)) for i in range(300)])
    mem.remove(["e3", "e10"])
    queries = np.stack([_unit(rng.normal(size=8)) for _ in range(5)])
    sims, labels = mem.search_batch("d", queries, k=7)
    assert sims.shape == (5, 7)
    for q, row_sims, row_labels in zip(queries, sims, labels, strict=True):
        one_sims, one_labels = mem.search("d", q, k=7)
        np.testing.assert_allclose(row_sims, one_sims, rtol=1e-6)
        assert row_labels == one_labels
    empty_sims, empty_labels = mem.search_batch("missing", queries, k=7)
    assert empty_sims.shape[0] == 5 and empty_labels == [[]] * 5


def test_one_writer_and_concurrent_readers(kind):
    """The sync thread appends and deletes while request threads search: no errors, sorted results, and
    the final state is exactly what the writer did. ``exact_below=500`` makes ``ann`` cross into the
    index while readers run (and ``ivf`` into its lists)."""
    dim = 8
    mem = _memory(kind, dim=dim, exact_below=500 if kind in ("ann", "ann-indexed", "ivf") else None)
    data = clustered(2500, dim, seed=4)
    errors: list[BaseException] = []
    done = threading.Event()
    deleted = {f"e{i}" for i in range(0, 2500, 7)}

    def writer():
        try:
            for start in range(0, 2500, 50):
                batch = [
                    MemoryEntry(f"e{i}", "d", f"e{i}", data[i], 0.0, "v") for i in range(start, start + 50)
                ]
                mem.apply([*batch, *(Deletion(e.event_id) for e in batch if e.event_id in deleted)])
        except BaseException as exc:
            errors.append(exc)
        finally:
            done.set()

    def reader(seed: int):
        rng = np.random.default_rng(seed)
        try:
            while not done.is_set():
                q = data[rng.integers(0, 2500)]
                sims, labels = mem.search("d", q, k=16)
                assert np.all(np.diff(sims) <= 1e-6) and len(sims) == len(labels) <= 16
                bsims, blabels = mem.search_batch("d", np.stack([q, q]), k=4)
                assert bsims.shape[0] == 2 and len(blabels) == 2
                mem.class_means("d")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(s,)) for s in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert mem.wait_indexed(timeout=60)
    assert len(mem) == 2500 - len(deleted)
    assert not any(mem.contains(e) for e in deleted) and mem.contains("e1")
    for i in range(1, 2500, 97):
        sims, labels = mem.search("d", data[i], k=16)
        assert not deleted & set(labels)
        if f"e{i}" not in deleted:
            assert labels[0] == f"e{i}" and sims[0] == pytest.approx(1.0, abs=1e-5)
    if isinstance(mem, AnnMemory | IvfMemory):
        assert mem.indexed_domains() == ["d"]


# -- ANN-specific behaviour ------------------------------------------------------------------------------


def test_ann_recall_at_10_against_exact_on_50k_clustered_vectors():
    dim, n = 64, 50_000
    data = clustered(n, dim, seed=5, clusters=200)
    entries = [MemoryEntry(f"e{i}", "d", f"{i}", v, 0.0, "v") for i, v in enumerate(data)]
    exact, ann = make_memory("exact", dim), make_memory("ann", dim)
    exact.add(entries)
    ann.add(entries)
    assert ann.wait_indexed(timeout=300)
    assert ann.indexed_domains() == ["d"]  # 50k > the 20k exact threshold: the HNSW path answers
    queries = clustered(200, dim, seed=6, clusters=200)
    hits = 0
    for q in queries:
        truth = set(exact.search("d", q, k=10)[1])
        sims, labels = ann.search("d", q, k=10)
        hits += len(truth & set(labels))
        np.testing.assert_allclose(sims, data[[int(x) for x in labels]] @ q, rtol=1e-5, atol=1e-6)
    assert hits / (10 * len(queries)) >= 0.95


def test_ann_rebuilds_after_many_deletions_and_returns_to_exact_when_small():
    rng = np.random.default_rng(7)
    data = clustered(1200, 8, seed=8)
    mem = AnnMemory(8, exact_below=400)
    mem.add([MemoryEntry(f"e{i}", "d", f"e{i}", v, 0.0, "v") for i, v in enumerate(data)])
    assert mem.wait_indexed(timeout=60) and mem.indexed_domains() == ["d"]
    first = mem._ann["d"].index
    mem.remove([f"e{i}" for i in range(0, 1200, 2)])  # half the graph is tombstones: not yet rebuilt
    assert mem._ann["d"].index is first and mem._ann["d"].removed == 600
    mem.remove(["e1"])  # more than half: rebuilt (in the background) without them
    assert mem.wait_indexed(timeout=60)
    assert mem.indexed_domains() == ["d"] and len(mem) == 599
    assert mem._ann["d"].index is not first and mem._ann["d"].members == 599  # tombstones dropped
    for _ in range(10):
        q = data[rng.integers(0, 1200)]
        labels = mem.search("d", q, k=8)[1]
        assert len(labels) == 8 and all(int(lab[1:]) % 2 == 1 for lab in labels)
    mem.remove([f"e{i}" for i in range(1, 1000, 2)])  # 100 left, under half the threshold
    assert mem.indexed_domains() == [] and len(mem) == 100
    assert len(mem.search("d", data[1199], k=500)[1]) == 100


class _GatedIndex:
    """A usearch index whose first ``add`` (the build) waits for ``gate``; everything else passes through."""

    def __init__(self, index, gate: threading.Event) -> None:
        self._index, self._gate, self._first = index, gate, True

    def add(self, *args, **kwargs):
        if self._first:
            self._first = False
            assert self._gate.wait(60)
        return self._index.add(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._index, name)


class _GatedAnn(AnnMemory):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.started: list[str] = []  # builds that got the build slot, in order

    def _new_index(self):
        self.started.append(threading.current_thread().name)
        return _GatedIndex(super()._new_index(), self.gate)


def write_while_the_first_build_waits(mem, data: np.ndarray, at_gate) -> list[str]:
    """A writer crosses the index threshold (300 entries) and must return while the build waits at its
    gate (``at_gate()`` says it holds the build slot); it then adds 300 more and forgets 102, and
    searches stay exact meanwhile. Returns the forgotten ids."""

    def entries(lo: int, hi: int) -> list[MemoryEntry]:
        return [MemoryEntry(f"e{i}", "d", f"e{i}", data[i], 0.0, "v") for i in range(lo, hi)]

    writer = threading.Thread(target=mem.add, args=(entries(0, 300),))
    writer.start()
    writer.join(timeout=30)
    assert not writer.is_alive()  # returned while its build waits at the gate
    wait_for(at_gate, 30, 0.01, "the build at its gate")
    assert mem.indexed_domains() == [] and not mem.wait_indexed(timeout=0.05)
    assert mem.add(entries(300, 600)) == 300  # no second build of the domain while one is in flight
    forgotten = [f"e{i}" for i in range(0, 300, 3)] + ["e301", "e302"]
    assert mem.remove(forgotten) == len(forgotten)
    sims, labels = mem.search("d", data[450], k=5)  # exact meanwhile, later rows included
    assert labels[0] == "e450" and sims[0] == pytest.approx(1.0, abs=1e-5)
    return forgotten


def test_ann_builds_in_the_background_while_the_writer_goes_on_and_misses_nothing():
    """A graph build takes seconds at 20k entries and minutes at 1M: the writer must not wait for it
    (feedback-to-fix), searches stay exact until the swap, and entries added or forgotten meanwhile are
    in (or out of) the graph once it is swapped in."""
    data = clustered(900, 8, seed=9)
    mem = _GatedAnn(8, exact_below=300)
    forgotten = write_while_the_first_build_waits(mem, data, lambda: mem.started == ["ann-build-d"])

    mem.gate.set()
    assert mem.wait_indexed(timeout=60) and mem.indexed_domains() == ["d"]
    ann = mem._ann["d"]
    # the build's 300 rows, then the 298 rows added meanwhile and still alive, caught up at the swap
    assert ann.indexed == 600 and ann.members == 598
    assert ann.removed == 100  # built rows forgotten while building: taken out of the graph at the swap
    for i in range(1, 600, 7):
        labels = mem.search("d", data[i], k=8)[1]
        assert not set(forgotten) & set(labels)
        if f"e{i}" not in forgotten:
            assert labels[0] == f"e{i}"
    assert len(mem) == 600 - len(forgotten)


def test_ann_builds_one_graph_at_a_time():
    """A restart re-reads every domain: their builds queue instead of each holding a copy of its keys."""
    data = clustered(400, 8, seed=10)
    mem = _GatedAnn(8, exact_below=150)
    mem.add([MemoryEntry(f"a{i}", "a", "x", data[i], 0.0, "v") for i in range(200)])
    wait_for(lambda: mem.started == ["ann-build-a"], 30, 0.01, '"a" holding the build slot at its gate')
    mem.add([MemoryEntry(f"b{i}", "b", "x", data[i], 0.0, "v") for i in range(200, 400)])
    assert not mem.wait_indexed(timeout=0.3)
    assert mem.started == ["ann-build-a"] and mem.indexed_domains() == []  # "b" waits for the slot
    mem.gate.set()
    assert mem.wait_indexed(timeout=60)
    assert mem.started == ["ann-build-a", "ann-build-b"] and mem.indexed_domains() == ["a", "b"]


def test_ann_constructor_checks_its_arguments():
    with pytest.raises(ValueError, match="exact_below"):
        AnnMemory(8, exact_below=0)
    with pytest.raises(ValueError, match="connectivity"):
        AnnMemory(8, connectivity=1)
