"""Error memory with a bounded cost per lookup at any size: multi-table SimHash (an LSH forest) proposes
candidates, and the candidates are re-ranked by their exact cosine.

Same interface and semantics as ``InProcessMemory`` (it *is* one, plus an index): the float32 key matrix
stays the source of truth, so the compensator sees real neighbours with exact similarities (unlike
ReLoop2's bucket-sum sketch, whose bucket aggregates agreed with exact search on only ~19% of
near-duplicate queries at 1M entries).

Index, per domain of at least ``exact_below`` live entries:

- ``tables`` x 16 random hyperplanes through the domain's mean key (keys of one domain share a large
  common component; centring makes every bit split the domain instead of putting it on one side). The
  planes are a pure function of (dim, tables), the same on every replica; the centre, and when rows are
  merged, follow the batches a replica happened to read, so two replicas may propose different
  candidates for a query (as two HNSW graphs do); both re-rank them exactly;
- per table, every indexed row's 16-bit code, sorted (one flat ``uint32`` array of
  ``table << 16 | code`` and the matching rows). Sorting by the whole code sorts by every prefix at
  once, so the rows next to a query's position share the longest code prefixes with it (LSH forest,
  Bawa et al. 2005): a lookup takes ``window`` rows on each side in each table (one ``np.searchsorted``
  for all tables) instead of a bucket whose size depends on the data;
- the pool (at most ``tables * 2 * window`` rows, tombstones dropped) is narrowed to ``candidates`` rows
  by the Hamming distance between the query's and each row's full code (``tables * 16`` bits, an
  estimate of the angle read from 32 bytes per row), and those are scored exactly against the float32
  keys.

So a lookup touches a fixed number of rows whatever the domain holds: its cost is flat from a few hundred
to millions of entries (measured by ``ops.bench.memory``). Below ``exact_below`` live entries (default:
``candidates``, where the whole domain is no more than one lookup's re-ranked rows) a domain is scanned.

Writes: rows appended since the last merge (at most ``max_delta``) are scanned exactly, so an entry is
searchable as soon as ``add`` returns; the writer then hashes them and merges them into the sorted arrays
(a stable sort of one sorted run plus a short one: linear), privately, and swaps the new arrays in.
Deletions: the base class clears the row's ``alive`` flag under the lock, and every lookup drops
non-alive rows, so a forgotten entry is never returned from that moment; tombstones leave the sorted
arrays at the next rebuild (when they exceed half the indexed rows, or the domain has doubled since its
centre was taken: then the centre and every code are recomputed too).

Concurrency: one writer (the sync thread), many readers (request threads), as in ``AnnMemory``.
``_write_lock`` serialises writers; ``_lock`` (the base class's) is held only for snapshots. A
``_Forest`` is immutable once published, and rows below a snapshot's ``size`` never change (deletions
only flip ``alive``), so a search works on its snapshot without holding any lock.

Memory per indexed row: ``tables * 2`` bytes of codes (32 by default) plus ``tables * 8`` bytes of
sorted keys and rows (256): ~0.3 GB at 1M rows besides the 1.5 GB of float32 keys.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import numpy as np

from serving.memory import InProcessMemory, _Domain
from streams.redis_store import MemoryEntry

BITS = 16  # per table: codes are uint16, and ``table << BITS | code`` fits a uint32 for 65,536 tables
_HASH_CHUNK = 65_536  # rows hashed per matrix product when (re)building: bounds the float32 temporaries


def hyperplanes(dim: int, tables: int, bits: int) -> np.ndarray:
    """The (tables * bits, dim) hyperplane normals: a pure function of the shape, the same on every
    replica and restart (only the centre they pass through is taken from the data)."""
    rng = np.random.default_rng([0x15F0, dim, tables, bits])
    return rng.standard_normal((tables * bits, dim)).astype(np.float32)


@dataclass(frozen=True)
class _Forest:
    """One domain's published index; never mutated (the writer builds a new one and swaps it in)."""

    offsets: np.ndarray  # (tables * 16,) planes @ centre: a key's bit is (planes @ key > offset)
    codes: np.ndarray  # (capacity, tables) uint16 codes of rows [0, indexed); later rows are unset
    sorted_keys: np.ndarray  # (tables * members,) uint32 table << 16 | code, ascending
    sorted_rows: np.ndarray  # (tables * members,) int32 row of each sorted key
    members: int  # rows per table in the sorted arrays (tombstones included)
    indexed: int  # rows [0, indexed) are in the sorted arrays, except dead ones dropped at a rebuild
    dead: int  # of the members, rows deleted since this forest was built
    centred_at: int  # live entries when the centre was taken (recentred once the domain doubles)


class LshMemory(InProcessMemory):
    """``InProcessMemory`` with an LSH forest per domain of at least ``exact_below`` live entries."""

    def __init__(
        self,
        dim: int,
        *,
        device: str | None = None,
        tables: int = 32,
        window: int = 32,
        candidates: int = 256,
        exact_below: int | None = None,
        max_delta: int = 1024,
    ) -> None:
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        if tables < 4 or tables % 4:
            raise ValueError(
                f"tables must be a positive multiple of 4 (codes are read as uint64), got {tables}"
            )
        if window < 1 or candidates < 1 or max_delta < 1:
            raise ValueError("window, candidates and max_delta must be >= 1")
        if exact_below is not None and exact_below < 1:
            raise ValueError(f"exact_below must be at least 1 (1 indexes every domain), got {exact_below}")
        super().__init__(dim, device=device)
        self.tables = tables
        self.window = window
        self.candidates = candidates
        self.exact_below = candidates if exact_below is None else exact_below
        self.max_delta = max_delta
        self._planes = hyperplanes(dim, tables, BITS)
        self._tags = np.arange(tables, dtype=np.uint32) << np.uint32(BITS)
        self._offsets_window = np.arange(-window, window, dtype=np.int64)
        self._forests: dict[str, _Forest] = {}
        self._write_lock = threading.Lock()

    # -- hashing ---------------------------------------------------------------------------------------
    def _codes(self, keys: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """(n, tables) codes: bit j of table t is whether the key lies above plane 16*t + j."""
        above = (keys @ self._planes.T) > offsets
        packed = np.packbits(above.reshape(-1, self.tables, BITS), axis=2, bitorder="big")
        return packed.view(">u2")[..., 0].astype(np.uint16)

    def _hash_rows(self, d: _Domain, rows: np.ndarray, offsets: np.ndarray, out: np.ndarray) -> None:
        for start in range(0, rows.size, _HASH_CHUNK):
            part = rows[start : start + _HASH_CHUNK]
            out[part] = self._codes(d.keys[part], offsets)

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
                doomed: dict[str, int] = {}
                for event_id in dict.fromkeys(event_ids):
                    where = self._rows.get(event_id)
                    if where is None or not self._domains[where[0]].alive[where[1]]:
                        continue
                    forest = self._forests.get(where[0])
                    if forest is not None and where[1] < forest.indexed:
                        doomed[where[0]] = doomed.get(where[0], 0) + 1
                    else:
                        doomed.setdefault(where[0], 0)
            removed = super().remove(event_ids)  # clears ``alive``: no lookup returns them from here on
            for domain, in_index in doomed.items():
                self._after_removal(domain, in_index)
        return removed

    def _sync_index(self, domain: str) -> None:
        """Build the domain's forest when it becomes large; merge appended rows once they are many."""
        with self._lock:
            d = self._domains[domain]
            forest = self._forests.get(domain)
            size, live = d.size, d.live
        if forest is None:
            if live >= self.exact_below:
                self._build(domain, d, size)
        elif live >= 2 * forest.centred_at:
            self._build(domain, d, size)  # the centre was taken on a much smaller domain
        elif size - forest.indexed >= self.max_delta:
            self._merge(domain, d, forest, size)

    def _build(self, domain: str, d: _Domain, size: int) -> None:
        """Centre on the live mean, hash every live row, sort; then swap in (readers scan meanwhile)."""
        with self._lock:
            live = d.live
            centre = sum(d.class_sums.values(), np.zeros(self.dim)) / max(live, 1)
            alive = d.alive[:size].copy()
        offsets = (self._planes @ np.asarray(centre, dtype=np.float32)).astype(np.float32)
        rows = np.flatnonzero(alive)
        codes = np.zeros((max(64, d.keys.shape[0]), self.tables), dtype=np.uint16)
        self._hash_rows(d, rows, offsets, codes)
        keys = (codes[rows].T.astype(np.uint32) | self._tags[:, None]).ravel()
        order = np.argsort(keys, kind="stable")
        forest = _Forest(
            offsets=offsets,
            codes=codes,
            sorted_keys=keys[order],
            sorted_rows=np.tile(rows.astype(np.int32), self.tables)[order],
            members=int(rows.size),
            indexed=size,
            dead=0,
            centred_at=max(live, 1),
        )
        with self._lock:
            self._forests[domain] = forest

    def _merge(self, domain: str, d: _Domain, forest: _Forest, size: int) -> None:
        """Hash rows [indexed, size) and merge them into each table's sorted run."""
        with self._lock:
            alive = d.alive[forest.indexed : size].copy()
        new = np.flatnonzero(alive) + forest.indexed
        codes = forest.codes
        if codes.shape[0] < size:
            codes = np.zeros((max(size, d.keys.shape[0]), self.tables), dtype=np.uint16)
            codes[: forest.indexed] = forest.codes[: forest.indexed]
        self._hash_rows(d, new, forest.offsets, codes)
        m, a = forest.members, int(new.size)
        keys = np.empty(self.tables * (m + a), dtype=np.uint32)
        rows = np.empty(self.tables * (m + a), dtype=np.int32)
        old_keys = forest.sorted_keys.reshape(self.tables, m)
        old_rows = forest.sorted_rows.reshape(self.tables, m)
        new_keys = codes[new].T.astype(np.uint32) | self._tags[:, None]
        for t in range(self.tables):  # the tables' key ranges are disjoint: merge each in its own slice
            k = np.concatenate([old_keys[t], new_keys[t]])
            order = np.argsort(k, kind="stable")  # timsort: a sorted run plus a short one, linear
            keys[t * (m + a) : (t + 1) * (m + a)] = k[order]
            rows[t * (m + a) : (t + 1) * (m + a)] = np.concatenate([old_rows[t], new.astype(np.int32)])[order]
        merged = _Forest(
            offsets=forest.offsets,
            codes=codes,
            sorted_keys=keys,
            sorted_rows=rows,
            members=m + a,
            indexed=size,
            dead=forest.dead,
            centred_at=forest.centred_at,
        )
        with self._lock:
            self._forests[domain] = merged

    def _after_removal(self, domain: str, in_index: int) -> None:
        with self._lock:
            forest = self._forests.get(domain)
            d = self._domains[domain]
            size, live = d.size, d.live
            if forest is None:
                return
            if live == 0 or live < self.exact_below // 2:
                self._forests.pop(domain)  # small again: exact scans, and the index's memory is returned
                return
            forest = replace(forest, dead=forest.dead + in_index)
            self._forests[domain] = forest
        if 2 * forest.dead >= forest.members:
            self._build(domain, d, size)  # tombstones crowd the windows out: drop them

    # -- reads (request threads) -----------------------------------------------------------------------
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
        width = max((len(labels) for _, labels in results), default=0)
        sims = np.full((len(results), width), -np.inf, dtype=np.float32)
        filler = next((labels[0] for _, labels in results if labels), "")
        out_labels = []
        for i, (row_sims, labels) in enumerate(results):
            sims[i, : len(labels)] = row_sims
            out_labels.append(labels + [labels[-1] if labels else filler] * (width - len(labels)))
        return sims, out_labels

    def _search(self, domain: str, queries: np.ndarray, k: int) -> list[tuple[np.ndarray, list[str]]]:
        empty: tuple[np.ndarray, list[str]] = (np.zeros(0, dtype=np.float32), [])
        with self._lock:
            d = self._domains.get(domain)
            if d is None or d.live == 0:
                return [empty] * queries.shape[0]
            # Rows below ``size`` never change and growing the matrix makes a new array: a consistent view.
            keys, alive, size, live, labels = d.keys, d.alive, d.size, d.live, d.labels
            forest = self._forests.get(domain)
        k = min(k, live)
        if forest is None:
            all_sims = queries @ keys[:size].T
            if live < size:
                all_sims[:, ~alive[:size]] = -np.inf
            return [_top(sims, None, k, labels) for sims in all_sims]
        qcodes = self._codes(queries, forest.offsets)  # (n, tables)
        words = forest.codes.view(np.uint64)  # (capacity, tables / 4): a row's full code, 64 bits a word
        qwords = qcodes.view(np.uint64)
        tail = np.arange(forest.indexed, size)  # appended, not merged yet: scanned exactly
        m = forest.members
        lo = (np.arange(self.tables, dtype=np.int64) * m)[:, None]
        out = []
        for q, qc, qw in zip(queries, qcodes, qwords, strict=True):
            pos = np.searchsorted(forest.sorted_keys, qc.astype(np.uint32) | self._tags)
            at = np.clip(pos[:, None] + self._offsets_window, lo, lo + m - 1) if m else np.zeros(0, int)
            rows = np.sort(forest.sorted_rows[at], axis=None)
            rows = rows[np.r_[True, rows[1:] != rows[:-1]]] if rows.size else rows.astype(np.int64)
            rows = rows[alive[rows]]  # a forgotten entry is never a candidate
            if rows.size > self.candidates:
                hamming = np.bitwise_count(words[rows] ^ qw).sum(axis=1, dtype=np.int32)
                rows = rows[np.argpartition(hamming, self.candidates - 1)[: self.candidates]]
            if tail.size:
                rows = np.concatenate([rows, tail[alive[tail]]])
            out.append(_top(np.take(keys, rows, axis=0) @ q, rows, k, labels))
        return out

    def indexed_domains(self) -> list[str]:
        """Domains currently answered by the LSH forest (the rest are scanned exactly)."""
        with self._lock:
            return sorted(self._forests)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: the float32 key matrices (allocated capacity) and the forests (codes, sorted keys)."""
        with self._lock:
            keys = sum(d.keys.nbytes for d in self._domains.values())
            forests = list(self._forests.values())
        index = sum(f.codes.nbytes + f.sorted_keys.nbytes + f.sorted_rows.nbytes for f in forests)
        return {"keys_float32": int(keys), "lsh": int(index)}


def _top(
    sims: np.ndarray, rows: np.ndarray | None, k: int, labels: list[str]
) -> tuple[np.ndarray, list[str]]:
    """The ``k`` best of ``sims`` (descending) and their labels; ``rows`` maps positions to rows."""
    k = min(k, sims.shape[0])
    if k == 0:
        return np.zeros(0, dtype=np.float32), []
    idx = np.argpartition(-sims, k - 1)[:k] if k < sims.shape[0] else np.arange(sims.shape[0])
    idx = idx[np.argsort(-sims[idx], kind="stable")]
    idx = idx[np.isfinite(sims[idx])]  # a row deleted while an exact scan ran
    picked = idx if rows is None else rows[idx]
    return sims[idx].astype(np.float32, copy=False), [labels[i] for i in picked]
