"""In-process error-memory index, one per replica, fed from the Redis log.

Holds every labelled entry of the serving base model per domain as a dense float32 matrix (embeddings are
unit-norm, so a dot product is the cosine similarity) plus running class sums, which give the
nearest-class-mean head used for a domain that has no trained adapter yet. Brute-force top-K is exact and
cheap up to ~1e5 entries per domain; an ANN index is the later replacement behind the same interface.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from streams.redis_store import MemoryEntry


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

    def __post_init__(self) -> None:
        self.keys = np.zeros((64, self.dim), dtype=np.float32)

    def append(self, emb: np.ndarray, label: str) -> None:
        if self.size == self.keys.shape[0]:
            grown = np.zeros((self.keys.shape[0] * 2, self.dim), dtype=np.float32)
            grown[: self.size] = self.keys[: self.size]
            self.keys = grown
        self.keys[self.size] = emb
        self.size += 1
        self.labels.append(label)
        if label not in self.class_sums:
            self.class_sums[label] = np.zeros(self.dim, dtype=np.float64)
            self.class_counts[label] = 0
        self.class_sums[label] += emb
        self.class_counts[label] += 1


class InProcessMemory:
    """Thread-safe: the sync thread appends while request threads search."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._domains: dict[str, _Domain] = {}
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def add(self, entries: list[MemoryEntry]) -> int:
        added = 0
        with self._lock:
            for e in entries:
                if e.event_id in self._seen or e.embedding.shape != (self.dim,):
                    continue
                self._seen.add(e.event_id)
                self._domains.setdefault(e.domain, _Domain(self.dim)).append(e.embedding, e.label)
                added += 1
        return added

    def search(self, domain: str, query: np.ndarray, k: int) -> tuple[np.ndarray, list[str]]:
        """Top-``k`` cosine similarities (descending) and their labels within ``domain``."""
        with self._lock:
            d = self._domains.get(domain)
            if d is None or d.size == 0:
                return np.zeros(0, dtype=np.float32), []
            sims = d.keys[: d.size] @ query.astype(np.float32, copy=False)
            labels = d.labels
        k = min(k, sims.shape[0])
        idx = np.argpartition(-sims, k - 1)[:k] if k < sims.shape[0] else np.arange(sims.shape[0])
        idx = idx[np.argsort(-sims[idx])]
        return sims[idx], [labels[i] for i in idx]

    def class_means(self, domain: str) -> tuple[list[str], np.ndarray]:
        """Labels and unit-norm class means for the nearest-class-mean head."""
        with self._lock:
            d = self._domains.get(domain)
            if d is None or not d.class_sums:
                return [], np.zeros((0, self.dim), dtype=np.float32)
            labels = sorted(d.class_sums)
            means = np.stack([d.class_sums[lab] / d.class_counts[lab] for lab in labels]).astype(np.float32)
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        return labels, means / np.clip(norms, 1e-9, None)

    def labels(self, domain: str) -> list[str]:
        with self._lock:
            d = self._domains.get(domain)
            return sorted(d.class_sums) if d else []

    def domains(self) -> list[str]:
        with self._lock:
            return sorted(self._domains)

    def __len__(self) -> int:
        with self._lock:
            return sum(d.size for d in self._domains.values())
