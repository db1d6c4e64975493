"""The labelled stream format (docs/replay.md): JSON Lines, optionally gzipped, one event per line.

Strict about what the evaluation needs (``id``, ``ts``, ``text``, ``label``; ``domain`` optional) and
tolerant of everything else (provenance fields are ignored), so users can bring their own logs. Every
problem names the file and line, because a bad line in a 20k-event log must be findable.
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from streams.schemas import MAX_ID_CHARS, MAX_LABEL_CHARS, MAX_TEXT_CHARS

REQUIRED_FIELDS = ("id", "ts", "text", "label")


class StreamFormatError(ValueError):
    """A line of the stream file does not follow the format; carries where and why."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class StreamEvent:
    """One labelled event; ``ts`` is seconds since the epoch (naive ISO times are taken as UTC)."""

    id: str
    ts: float
    text: str
    label: str
    domain: str | None
    line: int


@dataclass(frozen=True)
class Stream:
    path: str
    events: list[StreamEvent]
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def labels(self) -> list[str]:
        return sorted({e.label for e in self.events})

    @property
    def domains(self) -> list[str | None]:
        return sorted({e.domain for e in self.events}, key=lambda d: (d is None, d or ""))


def parse_ts(value: object) -> float:
    """ISO-8601 string or epoch seconds -> epoch seconds; raises ValueError with the reason."""
    if isinstance(value, bool):
        raise ValueError("ts must be an ISO-8601 string or epoch seconds, not a boolean")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("ts must be finite")
        return float(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError("ts must be an ISO-8601 string (e.g. 2001-07-02T09:14:00) or epoch seconds")
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError as exc:
        raise ValueError(f"ts {value!r} is not ISO-8601 (e.g. 2001-07-02T09:14:00)") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _string(row: dict, key: str, limit: int, *, required: bool = True) -> str | None:
    value = row.get(key)
    if value is None and not required:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and key == "id":
        value = str(value)  # numeric ids are common in exported logs
    if not isinstance(value, str):
        raise ValueError(f"{key} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{key} must not be empty or whitespace")
    if len(value) > limit:
        raise ValueError(f"{key} has {len(value)} characters; driftserve accepts at most {limit}")
    return value


def parse_line(raw: str, line: int, path: str, stats: Counter) -> StreamEvent:
    try:
        row = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise StreamFormatError(path, line, f"not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(row, dict):
        raise StreamFormatError(path, line, f"expected a JSON object, got {type(row).__name__}")
    missing = [k for k in REQUIRED_FIELDS if k not in row]
    if missing:
        raise StreamFormatError(
            path, line, f"missing field(s) {', '.join(missing)} (required: {', '.join(REQUIRED_FIELDS)})"
        )
    try:
        text = row["text"]
        if isinstance(text, str) and len(text) > MAX_TEXT_CHARS:
            # The HTTP edge rejects longer texts; the model reads only the first tokens anyway.
            row = {**row, "text": text[:MAX_TEXT_CHARS]}
            stats["text_truncated"] += 1
        event = StreamEvent(
            id=_string(row, "id", MAX_ID_CHARS) or "",
            ts=parse_ts(row["ts"]),
            text=_string(row, "text", MAX_TEXT_CHARS) or "",
            label=_string(row, "label", MAX_LABEL_CHARS) or "",
            domain=_string(row, "domain", MAX_LABEL_CHARS, required=False),
            line=line,
        )
    except ValueError as exc:
        raise StreamFormatError(path, line, str(exc)) from exc
    extra = set(row) - {*REQUIRED_FIELDS, "domain"}
    if extra:
        stats["events_with_extra_fields"] += 1
    return event


def read_stream(path: str | Path, limit: int | None = None) -> Stream:
    """Read and validate a whole stream (``.jsonl`` or ``.jsonl.gz``), sorted by ``ts``.

    ``limit`` keeps the first N events in ts order (the whole file is still validated, so a CI run with
    ``--limit`` catches a bad line anywhere). An unsorted file is sorted stably and counted, not refused:
    exported logs are often ordered by something else.
    """
    p = Path(path)
    if not p.is_file():
        raise StreamFormatError(p, None, "no such file")
    if limit is not None and limit < 1:
        raise StreamFormatError(p, None, f"limit must be at least 1, got {limit}")
    opener = gzip.open if p.name.endswith(".gz") else open
    stats: Counter = Counter()
    events: list[StreamEvent] = []
    seen: dict[str, int] = {}
    try:
        with opener(p, "rt", encoding="utf-8") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    stats["blank_lines"] += 1
                    continue
                event = parse_line(raw, number, str(p), stats)
                if event.id in seen:
                    raise StreamFormatError(
                        p, number, f"duplicate id {event.id!r} (first on line {seen[event.id]})"
                    )
                seen[event.id] = number
                events.append(event)
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise StreamFormatError(p, None, f"cannot read: {exc}") from exc
    if not events:
        raise StreamFormatError(p, None, "the stream holds no events")
    unsorted = sum(1 for a, b in itertools.pairwise(events) if b.ts < a.ts)
    if unsorted:
        stats["out_of_order_lines"] = unsorted
        events.sort(key=lambda e: e.ts)
    stats["events_in_file"] = len(events)
    if limit is not None:
        events = events[:limit]
    stats["events"] = len(events)
    return Stream(path=str(p), events=events, stats=dict(stats))


def split_warmup(events: list[StreamEvent], share: float) -> int:
    """How many leading events form the warm-up; at least one event is always left to evaluate."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"warm-up share must be in [0, 1), got {share}")
    return min(len(events) - 1, round(len(events) * share))
