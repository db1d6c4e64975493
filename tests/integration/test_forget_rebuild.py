"""Forget events and rebuilding the error memory from the log, on the running stack."""

from __future__ import annotations

import time

from ops.memory_admin import Rebuilder
from tests.conftest import wait_for
from tests.integration.conftest import BackgroundLoad, send_feedback

ROWS = [
    ("My card was charged twice this month", "billing"),
    ("The app freezes when I upload a photo", "bug"),
    ("Please send me last month's invoice", "billing"),
    ("Saving a draft deletes my text", "bug"),
]


def _entries(client) -> int:
    return client.get("/healthz").json()["memory_entries"]


def _stable_entries(client, expected: int) -> bool:
    """True once several answers in a row (both replicas) report ``expected`` entries."""
    return all(_entries(client) == expected for _ in range(6))


def _buffer_ids(stack, domain: str) -> set[str]:
    path = stack.settings.state_dir.resolve() / "learner" / "buffers" / f"{domain}.jsonl"
    if not path.exists():
        return set()
    import json

    return {json.loads(line)["event_id"] for line in path.read_text().splitlines() if line.strip()}


def test_forget_by_event_and_subject_reaches_memory_and_learner(client, producer, stack, unique):
    domain = unique("forget")
    rows = [
        {"event_id": f"{domain}-{i}", "text": t, "label": lab, "domain": domain}
        for i, (t, lab) in enumerate(ROWS)
    ]
    rows[1]["subject_id"] = f"{domain}-alice"
    rows[2]["subject_id"] = f"{domain}-alice"
    base = _entries(client)
    send_feedback(producer, stack.settings.feedback_topic, rows)
    wait_for(lambda: _stable_entries(client, base + 4), 15, what="4 entries on every replica")
    wait_for(lambda: _buffer_ids(stack, domain) == {r["event_id"] for r in rows}, 15, what="learner buffer")

    r1 = client.post("/v1/forget", json={"event_ids": [rows[0]["event_id"]], "reason": "user request"})
    r2 = client.post("/v1/forget", json={"subject_id": f"{domain}-alice"})
    assert r1.status_code == 202 and r2.status_code == 202, (r1.text, r2.text)
    sent = time.monotonic()
    wait_for(lambda: _stable_entries(client, base + 1), 10, what="forgotten entries gone on every replica")
    took = time.monotonic() - sent
    print(f"forget -> removed from every replica's memory in {took * 1000:.0f} ms")
    assert took < 5.0
    wait_for(lambda: _buffer_ids(stack, domain) == {rows[3]["event_id"]}, 15, what="learner buffer purged")

    # A redelivered forgotten event (by id or by subject) does not come back.
    send_feedback(producer, stack.settings.feedback_topic, rows[:3])
    late = {
        "event_id": f"{domain}-late",
        "text": "new text about alice",
        "label": "bug",
        "domain": domain,
        "subject_id": f"{domain}-alice",
    }
    marker = {
        "event_id": f"{domain}-marker",
        "text": "Where can I change my plan",
        "label": "billing",
        "domain": domain,
    }
    send_feedback(producer, stack.settings.feedback_topic, [late, marker])
    wait_for(lambda: _stable_entries(client, base + 2), 10, what="only the marker added")
    # The learner polls with a longer fetch wait than the memory writer; the marker shares the
    # domain's partition with the redelivered rows, so once it is buffered they have been handled.
    wait_for(lambda: marker["event_id"] in _buffer_ids(stack, domain), 15, what="marker buffered")
    assert _buffer_ids(stack, domain) == {rows[3]["event_id"], marker["event_id"]}


def test_rebuild_from_the_log_while_serving(client, producer, stack, unique):
    domain = unique("rebuild")
    rows = [
        {"event_id": f"{domain}-{i}", "text": t, "label": lab, "domain": domain}
        for i, (t, lab) in enumerate(ROWS)
    ]
    base = _entries(client)
    send_feedback(producer, stack.settings.feedback_topic, rows)
    wait_for(lambda: _stable_entries(client, base + 4), 15, what="entries before the rebuild")
    before = client.post("/v1/predict", json={"text": ROWS[0][0], "domain": domain}).json()

    with BackgroundLoad(stack.url, {"text": ROWS[1][0], "domain": domain}) as load:
        report = Rebuilder(stack.settings).run()
        late = {
            "event_id": f"{domain}-after",
            "text": "Refund the annual plan",
            "label": "billing",
            "domain": domain,
        }
        send_feedback(producer, stack.settings.feedback_topic, [late])
        wait_for(lambda: _stable_entries(client, base + 5), 20, what="the new generation plus a later event")
    failures, answered = load.failures, load.answered
    print(f"rebuild: {report}; {answered} requests answered during it")
    assert failures == [] and answered > 0
    assert report.generation >= 1 and report.added >= base + 4
    after = client.post("/v1/predict", json={"text": ROWS[0][0], "domain": domain}).json()
    assert after["label"] == before["label"] == "billing" and after["compensated"]
