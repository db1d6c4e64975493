"""Per-domain replay buffers of labelled feedback, persisted as append-only JSON Lines.

Appends are idempotent by event id (Kafka may redeliver), fsynced before the learner commits its
offsets, and reloaded on restart. Bounded by ``capacity`` per domain as a reservoir with a recent window:
the newest ``capacity // 2`` examples are always kept, and the rest is a uniform sample (reservoir
sampling, seeded) of everything older, so old data stays represented (the replay share of continual
training) instead of being dropped oldest-first. Files are compacted when they grow past twice the capacity.

The poll thread appends and forgets while the training worker reads snapshots: every method takes the
lock. ``generation(domain)`` changes with every forget that touches the domain, so a training run can
tell that its snapshot saw data that has been forgotten since.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from streams.schemas import FeedbackEvent


@dataclass(frozen=True)
class Example:
    event_id: str
    text: str
    label: str
    ts: float
    subject_id: str | None = None


class ReplayBuffers:
    def __init__(self, directory: Path, capacity: int = 20_000) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        if capacity < 2:
            raise ValueError(f"capacity must be at least 2, got {capacity}")
        self.capacity = capacity
        self._data: dict[str, OrderedDict[str, Example]] = {}
        self._new_since_train: dict[str, int] = {}
        self._generation: dict[str, int] = {}
        self._lines: dict[str, int] = {}
        self._seen: dict[str, int] = {}
        self._forgotten_ids: set[str] = set()
        self._forgotten_subjects: set[str] = set()
        self._rng = random.Random(0)
        self._lock = threading.RLock()
        self._load()
        self._load_forgotten()

    def _file(self, domain: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in domain)
        return self.directory / f"{safe}.jsonl"

    def _load(self) -> None:
        for path in sorted(self.directory.glob("*.jsonl")):
            with path.open() as fh:
                for line in fh:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a torn last line after a crash; the event is redelivered by Kafka
                    ex = Example(row["event_id"], row["text"], row["label"], row["ts"], row.get("subject_id"))
                    self._insert(row["domain"], ex)
                    self._lines[row["domain"]] = self._lines.get(row["domain"], 0) + 1

    def _insert(self, domain: str, ex: Example) -> bool:
        data = self._data.setdefault(domain, OrderedDict())
        if ex.event_id in data:
            return False
        data[ex.event_id] = ex
        seen = self._seen[domain] = self._seen.get(domain, 0) + 1
        if len(data) > self.capacity:
            # Algorithm R over the examples leaving the recent window: the one that just left is kept
            # with probability reservoir / (examples that ever left), replacing a random older one.
            recent = self.capacity // 2
            reservoir = self.capacity - recent
            keys = list(itertools.islice(data, reservoir + 1))  # the old part; its last just left the window
            left = max(reservoir + 1, seen - recent)
            if self._rng.random() < reservoir / left:
                victim = keys[self._rng.randrange(reservoir)]
            else:
                victim = keys[reservoir]
            del data[victim]
        return True

    def _rewrite(self, domain: str) -> None:
        rows = self._data.get(domain, {}).values()
        _atomic_write(
            self._file(domain), "".join(json.dumps({"domain": domain, **ex.__dict__}) + "\n" for ex in rows)
        )
        self._lines[domain] = len(rows)

    def add(self, events: list[FeedbackEvent]) -> list[str]:
        """Append new events durably; returns the domains that received any."""
        with self._lock:
            return self._add(events)

    def _add(self, events: list[FeedbackEvent]) -> list[str]:
        touched: dict[str, list[Example]] = {}
        for e in events:
            if e.event_id in self._forgotten_ids or (
                e.subject_id and e.subject_id in self._forgotten_subjects
            ):
                continue  # a redelivery of forgotten data must not come back
            ex = Example(e.event_id, e.text, e.label, e.ts, e.subject_id)
            if self._insert(e.domain, ex):
                touched.setdefault(e.domain, []).append(ex)
        for domain, rows in touched.items():
            with self._file(domain).open("a") as fh:
                for ex in rows:
                    fh.write(json.dumps({"domain": domain, **ex.__dict__}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._lines[domain] = self._lines.get(domain, 0) + len(rows)
            if self._lines[domain] > 2 * self.capacity:
                self._rewrite(domain)
            self._new_since_train[domain] = self._new_since_train.get(domain, 0) + len(rows)
        return sorted(touched)

    def _forgotten_file(self) -> Path:
        return self.directory / "forgotten.json"

    def _load_forgotten(self) -> None:
        path = self._forgotten_file()
        if path.exists():
            data = json.loads(path.read_text())
            self._forgotten_ids = set(data.get("ids", []))
            self._forgotten_subjects = set(data.get("subjects", []))

    def forget(self, event_ids: list[str], subject_id: str | None) -> list[str]:
        """Remove matching examples from memory and disk (files rewritten atomically); remember the
        forget so redeliveries are refused. Returns the domains that lost data."""
        with self._lock:
            return self._forget(event_ids, subject_id)

    def _forget(self, event_ids: list[str], subject_id: str | None) -> list[str]:
        self._forgotten_ids.update(event_ids)
        if subject_id:
            self._forgotten_subjects.add(subject_id)
        _atomic_write(
            self._forgotten_file(),
            json.dumps({"ids": sorted(self._forgotten_ids), "subjects": sorted(self._forgotten_subjects)}),
        )
        ids = set(event_ids)
        touched = []
        for domain, data in self._data.items():
            gone = [k for k, ex in data.items() if k in ids or (subject_id and ex.subject_id == subject_id)]
            if not gone:
                continue
            for k in gone:
                del data[k]
            self._rewrite(domain)
            self._generation[domain] = self._generation.get(domain, 0) + 1
            touched.append(domain)
        return touched

    def examples(self, domain: str) -> list[Example]:
        with self._lock:
            return list(self._data.get(domain, {}).values())

    def snapshot(self, domain: str) -> tuple[list[Example], int, int]:
        """(examples, forget generation, new-since-train count), consistent with each other."""
        with self._lock:
            return self.examples(domain), self.generation(domain), self.new_since_train(domain)

    def generation(self, domain: str) -> int:
        with self._lock:
            return self._generation.get(domain, 0)

    def new_since_train(self, domain: str) -> int:
        with self._lock:
            return self._new_since_train.get(domain, len(self._data.get(domain, {})))

    def mark_trained(self, domain: str, consumed: int | None = None) -> None:
        """``consumed``: how many new examples the run saw (arrivals during the run still count)."""
        with self._lock:
            if consumed is None:
                self._new_since_train[domain] = 0
            else:
                self._new_since_train[domain] = max(0, self.new_since_train(domain) - consumed)

    def domains(self) -> list[str]:
        with self._lock:
            return sorted(self._data)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
