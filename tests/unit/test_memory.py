from __future__ import annotations

import threading

import numpy as np

from serving.memory import InProcessMemory
from streams.redis_store import MemoryEntry


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def _entry(i: int, vec, label: str, domain: str = "d") -> MemoryEntry:
    return MemoryEntry(f"e{i}", domain, label, _unit(vec), float(i), "v")


def test_search_returns_nearest_first_within_domain():
    mem = InProcessMemory(dim=2)
    mem.add([_entry(1, [1, 0], "a"), _entry(2, [0, 1], "b"), _entry(3, [1, 0.1], "a", domain="other")])
    sims, labels = mem.search("d", _unit([1, 0.2]), k=5)
    assert labels == ["a", "b"]
    assert sims[0] > sims[1]
    assert mem.search("missing", _unit([1, 0]), k=3)[1] == []


def test_duplicate_event_ids_and_wrong_dims_are_ignored():
    mem = InProcessMemory(dim=2)
    assert mem.add([_entry(1, [1, 0], "a"), _entry(1, [0, 1], "b")]) == 1
    bad = MemoryEntry("e9", "d", "a", np.ones(3, dtype=np.float32), 0.0, "v")
    assert mem.add([bad]) == 0
    assert len(mem) == 1


def test_class_means_and_growth_past_initial_capacity():
    mem = InProcessMemory(dim=2)
    mem.add([_entry(i, [1, 0] if i % 2 else [0, 1], "a" if i % 2 else "b") for i in range(200)])
    labels, means = mem.class_means("d")
    assert labels == ["a", "b"]
    np.testing.assert_allclose(means, [[1, 0], [0, 1]], atol=1e-6)
    assert len(mem) == 200
    sims, _ = mem.search("d", _unit([1, 0]), k=150)
    assert len(sims) == 150


def test_concurrent_add_and_search():
    mem = InProcessMemory(dim=4)
    rng = np.random.default_rng(0)
    errors: list[Exception] = []

    def writer():
        for i in range(500):
            mem.add([_entry(i, rng.normal(size=4), str(i % 3))])

    def reader():
        try:
            for _ in range(500):
                mem.search("d", _unit([1, 0, 0, 0]), k=8)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(mem) == 500


def test_remove_masks_entries_and_updates_class_means():
    from streams.redis_store import Deletion

    mem = InProcessMemory(dim=2)
    mem.apply([_entry(1, [1, 0], "a"), _entry(2, [0, 1], "b"), _entry(3, [1, 0.2], "a"), Deletion("e1")])
    assert len(mem) == 2 and not mem.contains("e1") and mem.contains("e3")
    sims, labels = mem.search("d", _unit([1, 0]), k=10)
    assert labels == ["a", "b"] and len(sims) == 2
    mem.remove(["e2"])
    assert mem.class_means("d")[0] == ["a"]
    assert mem.add([_entry(2, [0, 1], "b")]) == 0  # a deleted id is not re-added by a redelivery


def test_batch_search_matches_single_search():
    rng = np.random.default_rng(2)
    mem = InProcessMemory(dim=8)
    mem.add([_entry(i, rng.normal(size=8), str(i % 4)) for i in range(300)])
    mem.remove(["e3", "e10"])
    queries = np.stack([_unit(rng.normal(size=8)) for _ in range(5)])
    sims, labels = mem.search_batch("d", queries, k=7)
    for q, row_sims, row_labels in zip(queries, sims, labels, strict=True):
        one_sims, one_labels = mem.search("d", q, k=7)
        np.testing.assert_allclose(row_sims, one_sims, rtol=1e-6)
        assert row_labels == one_labels
