"""Error memory for domains too large for brute force: an HNSW graph (usearch) per large domain.

Same interface and semantics as ``InProcessMemory`` (it *is* one, plus an index): the float32 key matrix
stays the source of truth. A domain below ``exact_below`` live entries is searched exactly, as before;
at that size an HNSW graph over int8-quantised copies of its keys (a quarter of the float32 bytes) is
built, and a query then asks the graph for ``candidates`` rows and re-scores them exactly against the
float32 keys. The similarities returned are therefore exact cosines (the compensator's lambda and
softmax depend on them); only the choice of neighbours is approximate.

Why usearch: a binary wheel here (faiss-cpu is one too; hnswlib needs compiling), incremental adds,
deletions that drop a key from results (faiss's HNSW cannot remove), int8 storage for cosine, and a
fast build (100k keys of dim 384 in ~6 s, 1M in 3-5 min on 2 shared cores). Pinned below 2.26: those
wheels use pybind11 internals v12 while onnxruntime and torch use v11, and importing onnxruntime after
such a usearch segfaults. Memory at 1M x 384: 1.61 GB of float32 keys (allocated capacity) plus 0.80 GB
of graph and int8 vectors (``memory_bytes()``), ~2.2 GB of RSS in all.

Concurrency: one writer (the sync thread), many readers (request threads). ``_write_lock`` serialises
writers; ``_lock`` (the base class's) guards the bookkeeping and is held only for short snapshots, so a
search never holds it while scanning; each index has its own lock because usearch's Python binding
releases the GIL but is not safe for concurrent calls on one index (every call shares thread context 0
and may ``reserve()``). Writers add to a live index in small chunks, bounding how long a search waits.
A new index (first build, rebuild after many deletions) is built on its own thread from a snapshot of the
rows, so the writer goes on applying entries (a build took 1.5 s at 20k entries of dim 384, and takes
minutes at 1M, during which feedback would otherwise wait); it is swapped in under the write lock, with
the rows forgotten meanwhile removed from it and the rows appended meanwhile added. Until then the
domain is scanned exactly (first build) or served by its old graph (rebuild). Rows appended but not yet
in the index are scanned exactly, so an entry is searchable as soon as ``add`` has appended it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from usearch.index import Index

from serving.memory import IndexedMemory, _Domain
from streams.redis_store import MemoryEntry

_CHUNK_ROWS = 64  # rows added to a live index per lock hold: ~5 ms of a search's wait on 2 busy cores


@dataclass
class _Ann:
    index: Index
    indexed: int  # rows [0, indexed) of the domain have been offered to the index (dead ones skipped)
    members: int  # rows added to the index, tombstones included
    removed: int = 0  # tombstones: rows removed from the index since it was built
    lock: threading.Lock = field(default_factory=threading.Lock)


class AnnMemory(IndexedMemory):
    """``InProcessMemory`` with an HNSW index per domain of at least ``exact_below`` live entries."""

    build_name = "ann"

    def __init__(
        self,
        dim: int,
        *,
        device: str | None = None,
        exact_below: int = 20_000,
        candidates: int = 64,
        connectivity: int = 16,
        expansion_add: int = 64,
        expansion_search: int = 64,
        build_threads: int | None = None,
        background: bool = True,
    ) -> None:
        """``background``: build (and rebuild) graphs on their own thread, so the writer goes on applying
        entries meanwhile (a build takes about 1.5 s at 20k entries, minutes at 1M); False: inline."""
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if exact_below < 1:
            raise ValueError(f"exact_below must be at least 1 (1 indexes every domain), got {exact_below}")
        if candidates < 1 or connectivity < 2 or expansion_add < 1 or expansion_search < 1:
            raise ValueError("candidates, expansion_add and expansion_search must be >= 1, connectivity >= 2")
        super().__init__(dim, device=device, background=background)
        self.exact_below = exact_below
        self.candidates = candidates
        self.connectivity = connectivity
        self.expansion_add = expansion_add
        self.expansion_search = expansion_search
        self.build_threads = build_threads or min(4, os.cpu_count() or 1)
        self._ann: dict[str, _Ann] = {}

    # -- writes (the sync thread) ----------------------------------------------------------------------
    def add(self, entries: list[MemoryEntry]) -> int:
        with self._write_lock:
            added = super().add(entries)
            if added:
                for domain in dict.fromkeys(e.domain for e in entries):
                    self._sync_index(domain)
        return added

    def remove(self, event_ids: list[str]) -> int:
        with self._write_lock:
            with self._lock:
                doomed: dict[str, list[int]] = {}
                for event_id in dict.fromkeys(event_ids):
                    where = self._rows.get(event_id)
                    if where is not None and self._domains[where[0]].alive[where[1]]:
                        doomed.setdefault(where[0], []).append(where[1])
            removed = super().remove(event_ids)
            for domain, rows in doomed.items():
                self._unindex(domain, rows)
        return removed

    def _new_index(self) -> Index:
        return Index(
            ndim=self.dim,
            metric="cos",
            dtype="i8",
            connectivity=self.connectivity,
            expansion_add=self.expansion_add,
            expansion_search=self.expansion_search,
        )

    def _sync_index(self, domain: str) -> None:
        """Bring the domain's index up to its appended rows; build it when the domain becomes large."""
        with self._lock:
            d = self._domains[domain]
            ann = self._ann.get(domain)
            size, live = d.size, d.live
        if ann is None:
            if live >= self.exact_below:
                self._start_build(domain, d, size)
            return
        start = ann.indexed
        while start < size:
            stop = min(size, start + _CHUNK_ROWS)
            rows = np.flatnonzero(d.alive[start:stop]) + start
            if rows.size:
                with ann.lock:
                    ann.index.add(rows.astype(np.uint64), d.keys[rows], threads=1)
            with self._lock:
                ann.indexed = stop
                ann.members += int(rows.size)
            start = stop
            time.sleep(0)  # let a search waiting on the index lock go first

    def _build(self, d: _Domain, size: int) -> tuple[np.ndarray, Index]:
        """A graph of the rows alive among [0, size): they never change, only ``alive`` may. The mask is
        copied under the lock: numpy counts the nonzeros, then may fill them in without the GIL, so a forget
        landing in between would leave uninitialised row numbers."""
        with self._lock:
            alive = d.alive[:size].copy()
        rows = np.flatnonzero(alive)
        index = self._new_index()
        index.add(rows.astype(np.uint64), d.keys[rows], threads=self.build_threads)
        return rows, index

    def _swap(self, domain: str, d: _Domain, size: int, built: tuple[np.ndarray, Index]) -> None:
        """Publish a graph of ``rows``: without those forgotten since it was built, with the rows appended
        since added. Caller holds ``_write_lock``."""
        rows, index = built
        with self._lock:
            current, live = self._domains.get(domain), d.live
            dead = rows[~d.alive[rows]]
        if current is not d or live < self.exact_below // 2:
            return  # emptied or small again while building: the domain stays exact
        if dead.size:
            index.remove(dead.astype(np.uint64))
        with self._lock:
            self._ann[domain] = _Ann(index, indexed=size, members=int(rows.size), removed=int(dead.size))
        self._sync_index(domain)

    def _unindex(self, domain: str, rows: Iterable[int]) -> None:
        with self._lock:
            ann = self._ann.get(domain)
            d = self._domains[domain]
            size, live = d.size, d.live
        if ann is None:
            return
        in_index = np.asarray([r for r in rows if r < ann.indexed], dtype=np.uint64)
        if in_index.size:
            with ann.lock:
                ann.index.remove(in_index)
            ann.removed += int(in_index.size)
        if live < self.exact_below // 2:
            with self._lock:  # small again: exact search, and the graph's memory is returned
                self._ann.pop(domain, None)
        elif ann.removed > ann.members // 2:
            self._start_build(domain, d, size)  # tombstones slow the graph walk and crowd out live rows

    # -- reads (request threads) -----------------------------------------------------------------------

    def _search(self, domain: str, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, list[str]]]:
        empty: tuple[np.ndarray, list[str]] = (np.zeros(0, dtype=np.float32), [])
        with self._lock:
            d = self._domains.get(domain)
            if d is None or d.live == 0:
                return [empty] * queries.shape[0]
            # Rows below ``size`` never change (deletions only flip ``alive``) and growing the matrix makes
            # a new array, so these references stay a consistent view without holding the lock.
            keys, alive, size, live, labels = d.keys, d.alive, d.size, d.live, d.labels
            ann = self._ann.get(domain) if live >= self.exact_below else None
            indexed = ann.indexed if ann is not None else 0
        k = min(k, live)
        if ann is None:
            all_sims = queries @ keys[:size].T
            if live < size:
                all_sims[:, ~alive[:size]] = -np.inf
            return [self._top(sims, None, k, labels) for sims in all_sims]
        with ann.lock:
            found = ann.index.search(queries, max(k, self.candidates), threads=1)
        keys_found = found.keys.reshape(queries.shape[0], -1)
        counts = np.atleast_1d(found.counts) if hasattr(found, "counts") else [keys_found.shape[1]]
        tail = np.arange(indexed, size)  # appended, not yet indexed: scanned exactly
        out = []
        for q, cand, count in zip(queries, keys_found, counts, strict=True):
            rows = cand[: int(count)].astype(np.int64)
            rows = rows[rows < size]  # the writer may have indexed rows newer than this snapshot
            if tail.size:
                rows = np.union1d(rows, tail)
            rows = rows[alive[rows]]  # a deletion may not have reached the index yet
            out.append(self._top(keys[rows] @ q, rows, k, labels))
        return out

    @staticmethod
    def _top(
        sims: np.ndarray, rows: np.ndarray | None, k: int, labels: list[str]
    ) -> tuple[np.ndarray, list[str]]:
        k = min(k, sims.shape[0])
        if k == 0:
            return np.zeros(0, dtype=np.float32), []
        idx = np.argpartition(-sims, k - 1)[:k] if k < sims.shape[0] else np.arange(sims.shape[0])
        idx = idx[np.argsort(-sims[idx])]
        idx = idx[np.isfinite(sims[idx])]  # a row deleted while this search ran
        picked = idx if rows is None else rows[idx]
        return sims[idx], [labels[i] for i in picked]

    def indexed_domains(self) -> list[str]:
        """Domains currently answered by the HNSW index (the rest are scanned exactly)."""
        with self._lock:
            return sorted(d for d, _ in self._ann.items() if self._domains[d].live >= self.exact_below)

    def set_search(self, *, expansion_search: int | None = None, candidates: int | None = None) -> None:
        """Trade recall for latency on the live indexes (see ``ops.bench.memory``)."""
        if expansion_search is not None:
            if expansion_search < 1:
                raise ValueError(f"expansion_search must be >= 1, got {expansion_search}")
            self.expansion_search = expansion_search
            with self._lock:
                anns = list(self._ann.values())
            for ann in anns:
                with ann.lock:
                    ann.index.expansion_search = expansion_search
        if candidates is not None:
            if candidates < 1:
                raise ValueError(f"candidates must be >= 1, got {candidates}")
            self.candidates = candidates

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: the float32 key matrices (allocated capacity) and the HNSW indexes (graph + int8)."""
        with self._lock:
            keys = sum(d.keys.nbytes for d in self._domains.values())
            anns = list(self._ann.values())
        return {"keys_float32": int(keys), "hnsw": sum(int(a.index.memory_usage) for a in anns)}
