"""The stream format: what is accepted, and that every refusal names the file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ops.replay.stream import StreamFormatError, parse_ts, read_stream, split_warmup


def write(path: Path, rows: list, gz: bool = False) -> Path:
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)
    return path


def row(i: int, **kw) -> dict:
    return {"id": f"e{i}", "ts": f"2020-01-01T00:00:{i:02d}", "text": f"text {i}", "label": "x", **kw}


def test_reads_gzip_sorted_and_ignores_extra_fields(tmp_path: Path) -> None:
    rows = [row(2, domain="a", source="crawl"), row(1), row(3, domain="b")]
    stream = read_stream(write(tmp_path / "s.jsonl.gz", rows, gz=True))
    assert [e.id for e in stream.events] == ["e1", "e2", "e3"]
    assert stream.events[0].domain is None and stream.events[1].domain == "a"
    assert stream.stats["out_of_order_lines"] == 1
    assert stream.stats["events_with_extra_fields"] == 1
    assert stream.domains == ["a", "b", None]
    assert stream.events[1].line == 1  # the line number in the file, not the sorted position


def test_limit_keeps_the_first_events_in_ts_order(tmp_path: Path) -> None:
    stream = read_stream(write(tmp_path / "s.jsonl", [row(3), row(1), row(2)]), limit=2)
    assert [e.id for e in stream.events] == ["e1", "e2"]
    assert stream.stats["events_in_file"] == 3


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        (json.dumps({"id": "x", "ts": 1, "text": "t"}), "missing field(s) label"),
        (json.dumps({"id": "x", "ts": "yesterday", "text": "t", "label": "l"}), "not ISO-8601"),
        (json.dumps({"id": "x", "ts": 1, "text": "  ", "label": "l"}), "text must not be empty"),
        (json.dumps({"id": "x", "ts": 1, "text": "t", "label": 3}), "label must be a string"),
        (
            json.dumps({"id": "x", "ts": 1, "text": "t", "label": "l", "domain": ""}),
            "domain must not be empty",
        ),
        (json.dumps({"id": "e1", "ts": 1, "text": "t", "label": "l"}), "duplicate id 'e1' (first on line 1)"),
    ],
)
def test_bad_lines_are_refused_with_their_line_number(tmp_path: Path, bad: str, message: str) -> None:
    path = write(tmp_path / "s.jsonl", [row(1), "", bad])
    with pytest.raises(StreamFormatError) as info:
        read_stream(path)
    assert info.value.line == 3
    assert f"{path}:3: " in str(info.value) and message in str(info.value)


def test_whole_file_problems(tmp_path: Path) -> None:
    with pytest.raises(StreamFormatError, match="no such file"):
        read_stream(tmp_path / "missing.jsonl")
    with pytest.raises(StreamFormatError, match="holds no events"):
        read_stream(write(tmp_path / "empty.jsonl", [""]))
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip")
    with pytest.raises(StreamFormatError, match="cannot read"):
        read_stream(tmp_path / "broken.jsonl.gz")


def test_long_texts_are_truncated_and_counted(tmp_path: Path) -> None:
    stream = read_stream(write(tmp_path / "s.jsonl", [row(1, text="w " * 20_000)]))
    assert len(stream.events[0].text) == 20_000
    assert stream.stats["text_truncated"] == 1


def test_timestamps() -> None:
    assert parse_ts("1970-01-01T00:01:00") == 60.0
    assert parse_ts("1970-01-01T01:00:00+01:00") == 0.0
    assert parse_ts(12.5) == 12.5
    with pytest.raises(ValueError):
        parse_ts(True)


def test_warmup_share_leaves_at_least_one_event() -> None:
    events = list(range(10))
    assert split_warmup(events, 0.1) == 1
    assert split_warmup(events, 0.0) == 0
    assert split_warmup(events[:1], 0.5) == 0
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        split_warmup(events, 1.0)
