"""Per-domain replay buffers of labelled feedback, persisted as append-only JSON Lines.

Appends are idempotent by event id (Kafka may redeliver), fsynced before the learner commits its
offsets, and reloaded on restart. Bounded by ``capacity`` per domain: the oldest examples are dropped
from memory first (a reservoir that keeps old data is the later refinement).
"""

from __future__ import annotations

import json
import os
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


class ReplayBuffers:
    def __init__(self, directory: Path, capacity: int = 20_000) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self._data: dict[str, OrderedDict[str, Example]] = {}
        self._new_since_train: dict[str, int] = {}
        self._load()

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
                    self._insert(
                        row["domain"], Example(row["event_id"], row["text"], row["label"], row["ts"])
                    )

    def _insert(self, domain: str, ex: Example) -> bool:
        data = self._data.setdefault(domain, OrderedDict())
        if ex.event_id in data:
            return False
        data[ex.event_id] = ex
        while len(data) > self.capacity:
            data.popitem(last=False)
        return True

    def add(self, events: list[FeedbackEvent]) -> list[str]:
        """Append new events durably; returns the domains that received any."""
        touched: dict[str, list[Example]] = {}
        for e in events:
            ex = Example(e.event_id, e.text, e.label, e.ts)
            if self._insert(e.domain, ex):
                touched.setdefault(e.domain, []).append(ex)
        for domain, rows in touched.items():
            with self._file(domain).open("a") as fh:
                for ex in rows:
                    fh.write(json.dumps({"domain": domain, **ex.__dict__}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            self._new_since_train[domain] = self._new_since_train.get(domain, 0) + len(rows)
        return sorted(touched)

    def examples(self, domain: str) -> list[Example]:
        return list(self._data.get(domain, {}).values())

    def new_since_train(self, domain: str) -> int:
        return self._new_since_train.get(domain, len(self._data.get(domain, {})))

    def mark_trained(self, domain: str) -> None:
        self._new_since_train[domain] = 0

    def domains(self) -> list[str]:
        return sorted(self._data)
