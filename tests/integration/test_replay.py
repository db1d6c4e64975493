"""``driftserve replay`` against the real embedded stack, on a small stream built here: the report is
complete, and on the broker's own record every label arrived after its prediction had been answered."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kafka import KafkaConsumer

from ops.replay import cli

TOPICS = {
    "billing": ["I was charged twice for my plan", "Please refund the duplicate payment",
                "My invoice shows the wrong amount", "Why was I billed after cancelling"],
    "bug": ["The app crashes when I open settings", "Clicking save does nothing at all",
            "The export button gives an empty file", "Search returns nothing for exact names"],
}  # fmt: skip


def build_stream(path: Path, domain: str, n: int = 40) -> list[dict]:
    rows = []
    for i in range(n):
        label = "billing" if i % 2 else "bug"
        text = f"{TOPICS[label][(i // 2) % 4]} (ticket {i})"
        rows.append({"id": f"{domain}-{i}", "ts": 1_700_000_000 + 60 * i, "text": text, "label": label,
                     "domain": domain})  # fmt: skip
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return rows


def feedback_records(stack, domain: str) -> dict[str, int]:
    """event id -> the broker's timestamp (ms) of its feedback record, for this test's domain."""
    consumer = KafkaConsumer(
        stack.settings.feedback_topic,
        bootstrap_servers=stack.settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=5000,
    )
    try:
        out = {}
        for record in consumer:
            if record.key == domain.encode():
                out[json.loads(record.value)["event_id"]] = record.timestamp
        return out
    finally:
        consumer.close()


def test_replay_reports_and_never_reveals_a_label_early(stack, unique, tmp_path: Path) -> None:
    domain = unique("replay")
    rows = build_stream(tmp_path / "tickets.jsonl", domain)
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "report"
    args = parser.parse_args(
        [str(tmp_path / "tickets.jsonl"), "--url", stack.url, "--bootstrap", stack.settings.kafka_bootstrap,
         "--warmup", "0.2", "--out", str(out), "--no-progress", "--fix-samples", "2", "--fix-timeout", "5",
         "--rollout-probes", "4", "--probe-every", "10"]
    )  # fmt: skip
    assert cli.run(args, stack.settings) == 0

    report = json.loads((out / "report.json").read_text())
    assert report["stream"]["warmup"] == 8 and report["stream"]["evaluated"] == 32
    assert report["errors"]["total"] == 0, report["errors"]
    assert report["warmup"]["absorbed"] is True
    assert report["systems"]["driftserve"]["n"] == 32
    assert set(report["systems"]) == {"driftserve", "static", "retrain", "ncm", "knn"}
    # Near-identical tickets repeat: with the warm-up in its error memory the system gets most right.
    assert report["systems"]["driftserve"]["accuracy"] >= 0.75
    assert report["latency_ms"]["n"] == 32 and report["latency_ms"]["p50"] > 0
    assert all((out / name).exists() for name in ("report.md", "quality_over_time.png", "events.jsonl"))

    predicted_at = {}
    for line in (out / "events.jsonl").read_text().splitlines():
        row = json.loads(line)
        predicted_at[row["event_id"]] = row["predicted_at"]
    records = feedback_records(stack, domain)
    assert set(records) == {r["id"] for r in rows}, "every label was sent exactly once"
    for event_id, ts_ms in records.items():
        if event_id in predicted_at:
            assert ts_ms >= int(predicted_at[event_id] * 1000), f"{event_id}: label before prediction"
    assert len(predicted_at) == 32 and not set(predicted_at) & {r["id"] for r in rows[:8]}
