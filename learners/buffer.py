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
    subject_id: str | None = None


class ReplayBuffers:
    def __init__(self, directory: Path, capacity: int = 20_000) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        self._data: dict[str, OrderedDict[str, Example]] = {}
        self._new_since_train: dict[str, int] = {}
        self._forgotten_ids: set[str] = set()
        self._forgotten_subjects: set[str] = set()
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
            lines = "".join(json.dumps({"domain": domain, **ex.__dict__}) + "\n" for ex in data.values())
            _atomic_write(self._file(domain), lines)
            touched.append(domain)
        return touched

    def examples(self, domain: str) -> list[Example]:
        return list(self._data.get(domain, {}).values())

    def new_since_train(self, domain: str) -> int:
        return self._new_since_train.get(domain, len(self._data.get(domain, {})))

    def mark_trained(self, domain: str) -> None:
        self._new_since_train[domain] = 0

    def domains(self) -> list[str]:
        return sorted(self._data)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
