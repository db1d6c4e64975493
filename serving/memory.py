"""In-process error-memory index, one per replica, fed from the Redis log.

Holds every labelled entry of the serving base model per domain as a dense float32 matrix (embeddings are
unit-norm, so a dot product is the cosine similarity) plus running class sums, which give the
nearest-class-mean head used for a domain that has no trained adapter yet. Brute-force top-K is exact and
cheap up to ~1e5 entries per domain; ``serving.ann_memory`` (HNSW) and ``serving.ivf_memory`` (inverted
file) add an index behind the same interface.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from serving.mixing import MixCalibrator, Outcome
from serving.scorer import FeedbackScorer, ScorerConfig
from streams.redis_store import MemoryEntry


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-9, None)


class ErrorMemory(Protocol):
    def add(self, entries: list[MemoryEntry]) -> int: ...

    def search(self, domain: str, query: np.ndarray, k: int) -> tuple[np.ndarray, list[str]]: ...

    def __len__(self) -> int: ...


@dataclass
class _Domain:
    dim: int
    size: int = 0
    keys: np.ndarray = field(init=False)
    labels: list[str] = field(default_factory=list)
    class_sums: dict[str, np.ndarray] = field(default_factory=dict)
    class_counts: dict[str, int] = field(default_factory=dict)

    live: int = 0
    deletions: int = 0  # bumps the device mirror's mask
    version: int = 0  # bumped by every append and removal: keys the cached class means
    means_cache: tuple | None = None  # (version, labels, unit-norm class means)
    device_keys: object = None  # torch tensor mirror of keys[:synced] on the accelerator
    device_alive: object = None
    synced: int = 0
    synced_deletions: int = 0

    def __post_init__(self) -> None:
        self.keys = np.zeros((64, self.dim), dtype=np.float32)
        self.alive = np.zeros(64, dtype=bool)

    def sync_device(self, device: str):
        """Copy rows added since the last search (and the alive mask after deletions) to the device."""
        import torch

        if self.device_keys is None or self.device_keys.shape[0] < self.size:
            capacity = max(64, self.keys.shape[0])
            grown = torch.zeros((capacity, self.dim), dtype=torch.float32, device=device)
            if self.device_keys is not None:
                grown[: self.synced] = self.device_keys[: self.synced]
            self.device_keys = grown
        if self.synced < self.size:
            self.device_keys[self.synced : self.size] = torch.from_numpy(
                self.keys[self.synced : self.size]
            ).to(device)
            self.synced = self.size
        if (
            self.device_alive is None
            or self.device_alive.shape[0] < self.size
            or self.synced_deletions != self.deletions
        ):
            self.device_alive = torch.from_numpy(self.alive[: self.size].copy()).to(device)
            self.synced_deletions = self.deletions
        return self.device_keys[: self.size], self.device_alive[: self.size]

    def append(self, emb: np.ndarray, label: str) -> int:
        if self.size == self.keys.shape[0]:
            grown = np.zeros((self.keys.shape[0] * 2, self.dim), dtype=np.float32)
            grown[: self.size] = self.keys[: self.size]
            self.keys = grown
            alive = np.zeros(grown.shape[0], dtype=bool)
            alive[: self.size] = self.alive[: self.size]
            self.alive = alive
        row = self.size
        self.keys[row] = emb
        self.alive[row] = True
        self.size += 1
        self.live += 1
        self.labels.append(label)
        if label not in self.class_sums:
            self.class_sums[label] = np.zeros(self.dim, dtype=np.float64)
            self.class_counts[label] = 0
        self.class_sums[label] += emb
        self.class_counts[label] += 1
        self.version += 1
        return row

    def remove(self, row: int) -> None:
        """Deleted rows stay in the matrix (masked) so that row numbers remain stable."""
        if not self.alive[row]:
            return
        self.alive[row] = False
        self.live -= 1
        self.deletions += 1
        self.version += 1
        label = self.labels[row]
        self.class_sums[label] -= self.keys[row]
        self.class_counts[label] -= 1
        if self.class_counts[label] == 0:
            del self.class_sums[label], self.class_counts[label]


class InProcessMemory:
    """Thread-safe: the sync thread appends while request threads search."""

    def __init__(self, dim: int, device: str | None = None, scorer: ScorerConfig | None = None) -> None:
        """``device`` (e.g. "cuda"): batched searches run there on a mirror of the keys. ``scorer``: the
        online experts that score a domain from its feedback (``serving.scorer``)."""
        self.dim = dim
        self.device = device if device and device != "cpu" else None
        self._domains: dict[str, _Domain] = {}
        self._rows: dict[str, tuple[str, int]] = {}  # event id -> (domain, row); deleted ids stay
        self._lock = threading.Lock()
        self.scorer = FeedbackScorer(dim, scorer)
        self.mixing = MixCalibrator()  # the head / memory weight of adapter-served domains
        self._stale: set[str] = set()  # domains whose scorer saw entries removed since
        self._deferring = False  # inside ``apply``: retrain the scorers once at the end
        self._centroids: tuple | None = None  # ((domain, version), ...), names, unit-norm centroids

    def add(self, entries: list[MemoryEntry]) -> int:
        """Store entries in order; the scorer learns each one after predicting it (prequential).

        Calibration needs each entry's neighbours from before it: they are found for the last
        ``calibrate_per_batch`` new entries of each domain in one batched search against the memory as it
        was before the batch (a bulk load or rebuild stays linear; a live stream calibrates on every
        entry). Only the sync thread writes.
        """
        fresh: list[MemoryEntry] = []
        with self._lock:
            seen: set[str] = set()
            for e in entries:
                if e.event_id in self._rows or e.event_id in seen or e.embedding.shape != (self.dim,):
                    continue
                seen.add(e.event_id)
                fresh.append(e)
        neighbours: dict[int, tuple] = {}
        if self.scorer.cfg.enabled:
            by_domain: dict[str, list[int]] = {}
            for i, e in enumerate(fresh):
                by_domain.setdefault(e.domain, []).append(i)
            for domain, rows in by_domain.items():
                rows = rows[-self.scorer.cfg.calibrate_per_batch :]
                if not self.scorer.knows(domain):
                    continue
                keys = np.stack([fresh[i].embedding for i in rows])
                sims, labels = self.search_batch(domain, keys, self.scorer.cfg.knn_k)
                means = self.class_means(domain)
                for j, i in enumerate(rows):
                    neighbours[i] = (sims[j], labels[j], *means)
        for i, e in enumerate(fresh):
            self.scorer.observe(e.domain, e.embedding, e.label, neighbours.get(i))
            if e.mix is not None:
                self.mixing.observe(e.event_id, e.domain, Outcome(*e.mix))
            with self._lock:
                row = self._domains.setdefault(e.domain, _Domain(self.dim)).append(e.embedding, e.label)
                self._rows[e.event_id] = (e.domain, row)
        return len(fresh)

    def remove(self, event_ids: list[str]) -> int:
        """Mask the entries and retrain the domain's scorer without them (exact unlearning)."""
        removed = self._remove(event_ids)
        if not self._deferring:
            self._rescore()
        return removed

    def _remove(self, event_ids: list[str]) -> int:
        removed = 0
        with self._lock:
            for event_id in event_ids:
                where = self._rows.get(event_id)
                if where is None:
                    continue
                d = self._domains[where[0]]
                if d.alive[where[1]]:
                    d.remove(where[1])
                    removed += 1
                    self._stale.add(where[0])
        if removed:
            self.mixing.forget(set(event_ids))
        return removed

    def _rescore(self) -> None:
        """Retrain the scorer of every domain that lost entries, once per batch of deletions."""
        with self._lock:
            live = {}
            for domain in self._stale:
                d = self._domains[domain]
                rows = np.flatnonzero(d.alive[: d.size])
                live[domain] = (d.keys[rows].copy(), [d.labels[r] for r in rows])
            self._stale.clear()
        for domain, (keys, labels) in live.items():
            self.scorer.rebuild(domain, keys, labels)

    def score(self, domain: str, keys: np.ndarray, sims: np.ndarray, labels: list[list[str]]):
        """The scorer's (vocabulary, probabilities) for ``keys`` given their neighbours in ``domain``."""
        return self.scorer.predict(domain, keys, sims, labels, *self.class_means(domain))

    def apply(self, ops: list) -> None:
        """Apply a batch from the Redis log in order: entries are added, deletions remove."""
        batch: list[MemoryEntry] = []
        self._deferring = True
        try:
            for op in ops:
                if isinstance(op, MemoryEntry):
                    batch.append(op)
                else:
                    self.add(batch)
                    batch = []
                    self.remove([op.event_id])
            self.add(batch)
        finally:
            self._deferring = False
            self._rescore()

    def contains(self, event_id: str) -> bool:
        with self._lock:
            where = self._rows.get(event_id)
            return where is not None and bool(self._domains[where[0]].alive[where[1]])

    def search(self, domain: str, query: np.ndarray, k: int) -> tuple[np.ndarray, list[str]]:
        """Top-``k`` cosine similarities (descending) and their labels within ``domain``."""
        with self._lock:
            d = self._domains.get(domain)
            if d is None or d.live == 0:
                return np.zeros(0, dtype=np.float32), []
            sims = d.keys[: d.size] @ query.astype(np.float32, copy=False)
            if d.live < d.size:
                sims[~d.alive[: d.size]] = -np.inf
            labels = d.labels
        k = min(k, d.live)
        idx = np.argpartition(-sims, k - 1)[:k] if k < sims.shape[0] else np.arange(sims.shape[0])
        idx = idx[np.argsort(-sims[idx])]
        return sims[idx], [labels[i] for i in idx]

    def search_batch(self, domain: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """Top-``k`` for many queries in one matrix product: sims (n, k') descending, labels per row."""
        n = queries.shape[0]
        with self._lock:
            d = self._domains.get(domain)
            if d is None or d.live == 0:
                return np.zeros((n, 0), dtype=np.float32), [[] for _ in range(n)]
            if self.device is not None:
                return self._search_device(d, queries, k)
            sims = queries.astype(np.float32, copy=False) @ d.keys[: d.size].T  # (n, size)
            if d.live < d.size:
                sims[:, ~d.alive[: d.size]] = -np.inf
            labels = d.labels
            k = min(k, d.live)
        if k < sims.shape[1]:
            idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            idx = np.broadcast_to(np.arange(sims.shape[1]), (n, sims.shape[1]))
        part = np.take_along_axis(sims, idx, axis=1)
        order = np.argsort(-part, axis=1)
        idx = np.take_along_axis(idx, order, axis=1)
        return np.take_along_axis(part, order, axis=1), _labels_of(labels, idx)

    def _search_device(self, d: _Domain, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        import torch

        from serving.encoder import to_host

        keys, alive = d.sync_device(self.device)
        q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
        sims = q @ keys.T
        sims.masked_fill_(~alive, float("-inf"))
        top, idx = torch.topk(sims, min(k, d.live), dim=1)
        top, idx = to_host(top, idx)
        return top, _labels_of(d.labels, idx)

    def class_means(self, domain: str) -> tuple[list[str], np.ndarray]:
        """Labels and unit-norm class means for the nearest-class-mean head. Computed once per change of
        the domain (every request's compensation and routing reads them); callers must not modify them."""
        with self._lock:
            d = self._domains.get(domain)
            if d is None or not d.class_sums:
                return [], np.zeros((0, self.dim), dtype=np.float32)
            if d.means_cache is None or d.means_cache[0] != d.version:
                labels = sorted(d.class_sums)
                means = np.stack([d.class_sums[lab] / d.class_counts[lab] for lab in labels])
                means = _unit_rows(means.astype(np.float32))
                means.flags.writeable = False
                d.means_cache = (d.version, labels, means)
            return list(d.means_cache[1]), d.means_cache[2]

    def domain_centroids(self) -> tuple[list[str], np.ndarray]:
        """Unit-norm mean key of each domain's live entries: the retrieval key of the domain. Computed
        once per change of the memory; callers must not modify the array."""
        with self._lock:
            state = tuple((n, d.version) for n, d in self._domains.items() if d.live > 0)
            if self._centroids is None or self._centroids[0] != state:
                names = [n for n, _ in state]
                if names:
                    sums = [sum(self._domains[n].class_sums.values()) for n in names]
                    cents = _unit_rows(np.stack(sums).astype(np.float32))
                else:
                    cents = np.zeros((0, self.dim), dtype=np.float32)
                cents.flags.writeable = False
                self._centroids = (state, names, cents)
            return list(self._centroids[1]), self._centroids[2]

    def labels(self, domain: str) -> list[str]:
        with self._lock:
            d = self._domains.get(domain)
            return sorted(d.class_sums) if d else []

    def domains(self) -> list[str]:
        with self._lock:
            return sorted(self._domains)

    def __len__(self) -> int:
        with self._lock:
            return sum(d.live for d in self._domains.values())

    def wait_indexed(self, timeout: float | None = None) -> bool:
        """Wait for index work running in the background (none here: every kind answers meanwhile)."""
        return True


class IndexedMemory(InProcessMemory):
    """Base of the approximate kinds: they answer each query from their own index (``_search``, one
    (sims, labels) pair per query) for the domains in ``indexed_domains()``, exactly below that.

    Index builds (a domain's first, and the rebuilds its kind decides on) run on their own thread, one at
    a time per replica: ``_build`` makes the index from a snapshot of the rows [0, size) (they never
    change; only ``alive`` may), then ``_swap`` publishes it under the write lock, accounting for the rows
    forgotten and appended meanwhile. The writer (the sync thread, applying feedback) never waits for a
    build, and until the swap the domain is answered as before (an exact scan, or the previous index).
    ``background`` False builds inline, on the writer's thread.
    """

    build_name = "index"  # build threads are named "<build_name>-build-<domain>"

    def __init__(self, dim: int, *, device: str | None = None, background: bool = True) -> None:
        super().__init__(dim, device=device)
        self.background = background
        self._write_lock = threading.Lock()  # one writer: the sync thread's add/remove, and a swap
        self._building: dict[str, threading.Thread] = {}  # domain -> its build in flight
        # One build at a time: a restart that re-reads many large domains must not hold a copy of every
        # domain's keys and run every build at once.
        self._build_slot = threading.Lock()

    def _start_build(self, domain: str, d: _Domain, size: int) -> None:
        """Build the domain's index over rows [0, size) and swap it in. Caller holds ``_write_lock``; a
        domain whose build is in flight is not built again (the swap catches up with what came since)."""
        if not self.background:
            self._swap(domain, d, size, self._build(d, size))
            return
        if domain not in self._building:
            self._building[domain] = thread = threading.Thread(
                target=self._build_in_background,
                args=(domain, d, size),
                name=f"{self.build_name}-build-{domain}",
                daemon=True,
            )
            thread.start()

    def _build_in_background(self, domain: str, d: _Domain, size: int) -> None:
        try:
            with self._build_slot:
                built = self._build(d, size)
        except BaseException:
            self._building.pop(domain, None)
            raise
        with self._write_lock:  # no writer runs during the swap
            # No longer in flight before the swap: what the swap catches up with may call for the next
            # build (a domain that doubled while this one ran), and it must not be skipped as a duplicate.
            self._building.pop(domain, None)
            self._swap(domain, d, size, built)

    def _build(self, d: _Domain, size: int) -> Any:
        """A new index of the rows alive among [0, size), built without holding any lock."""
        raise NotImplementedError

    def _swap(self, domain: str, d: _Domain, size: int, built: Any) -> None:
        """Publish ``built``; caller holds ``_write_lock``."""
        raise NotImplementedError

    def wait_indexed(self, timeout: float | None = None) -> bool:
        """Wait for the index builds in flight; False if one is still running after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            threads = list(self._building.values())
            if not threads:
                # A build's swap runs under the write lock, after leaving ``_building``.
                left = -1 if deadline is None else max(0.0, deadline - time.monotonic())
                if not self._write_lock.acquire(timeout=left):
                    return False
                try:
                    if not self._building:
                        return True
                finally:
                    self._write_lock.release()
                continue
            for thread in threads:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                thread.join(left)
                if thread.is_alive():
                    return False

    def search(self, domain: str, query: np.ndarray, k: int) -> tuple[np.ndarray, list[str]]:
        """Top-``k`` cosine similarities (descending) and their labels within ``domain``."""
        return self._search(domain, np.asarray(query, dtype=np.float32).reshape(1, -1), k)[0]

    def search_batch(self, domain: str, queries: np.ndarray, k: int) -> tuple[np.ndarray, list[list[str]]]:
        """``search`` for many queries: sims (n, k') descending, labels per row.

        An approximate search may find fewer than ``k'`` live neighbours for a row; such a row is padded
        with similarity ``-inf`` (weight 0 in ``compensate_batch``) and a repeat of a real label, so the
        result stays rectangular.
        """
        q = np.asarray(queries, dtype=np.float32)
        if self.device is not None and domain not in self.indexed_domains():
            return super().search_batch(domain, q, k)  # exact, on the accelerator's mirror of the keys
        results = self._search(domain, q.reshape(q.shape[0], -1), k)
        if len(results) == 1:  # one row is rectangular as it is
            row_sims, labels = results[0]
            return np.asarray(row_sims, dtype=np.float32).reshape(1, -1), [labels]
        width = max((len(labels) for _, labels in results), default=0)
        sims = np.full((len(results), width), -np.inf, dtype=np.float32)
        filler = next((labels[0] for _, labels in results if labels), "")
        out_labels = []
        for i, (row_sims, labels) in enumerate(results):
            sims[i, : len(labels)] = row_sims
            out_labels.append(labels + [labels[-1] if labels else filler] * (width - len(labels)))
        return sims, out_labels

    def _search(self, domain: str, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, list[str]]]:
        raise NotImplementedError

    def indexed_domains(self) -> list[str]:
        raise NotImplementedError


def _labels_of(labels: list[str], idx: np.ndarray) -> list[list[str]]:
    """The label of each index, row by row (``map`` over plain ints: a few times faster than indexing
    a Python list with numpy scalars)."""
    get = labels.__getitem__
    return [list(map(get, row)) for row in idx.tolist()]


def make_memory(kind: str, dim: int, device: str | None = None) -> InProcessMemory:
    """The replica's memory index chosen by settings: ``"exact"`` (brute force per domain), ``"ann"``
    (the same, plus an HNSW index for domains of 20k entries or more; see ``serving.ann_memory``) or
    ``"ivf"`` (the same, plus an inverted file whose pool is narrowed by SimHash and re-ranked exactly: a
    lookup touches a bounded number of rows at any size; see ``serving.ivf_memory``)."""
    if kind == "exact":
        return InProcessMemory(dim, device=device)
    if kind == "ann":
        from serving.ann_memory import AnnMemory  # imported on demand: usearch is needed only here

        return AnnMemory(dim, device=device)
    if kind == "ivf":
        from serving.ivf_memory import IvfMemory

        return IvfMemory(dim, device=device)
    raise ValueError(f"memory index must be 'exact', 'ann' or 'ivf', got {kind!r}")
