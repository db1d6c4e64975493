"""``migrate-base`` on the running stack: the memory is re-keyed under the new base's fingerprint and the
promoted adapter is transferred, while the replicas go on answering from the old base and its memory."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from learners.trainer import TrainConfig
from learners.transfer import TransferConfig
from ops.migrate import migrate_base
from serving.artifacts import load_artifact
from serving.encoder import model_fingerprint
from streams.redis_store import MemoryLog, connect
from streams.registry_store import RegistryConflict, RegistryStore
from tests.conftest import wait_for
from tests.integration.conftest import BackgroundLoad, send_feedback

TICKETS = [
    ("I was charged twice for my plan", "billing"),
    ("The app crashes when I open settings", "bug"),
    ("Please refund the duplicate payment", "billing"),
    ("Uploading a photo freezes the screen", "bug"),
    ("My invoice shows the wrong amount", "billing"),
    ("The login button does nothing", "bug"),
    ("Cancel my subscription and refund me", "billing"),
    ("Search results never load", "bug"),
    ("Why was my card declined at checkout", "billing"),
    ("The export button throws an error", "bug"),
]


def test_migrate_base_while_serving(client, producer, stack, unique, tiny_model_dir):
    domain = unique("migrate")
    rows = [
        {"event_id": f"{domain}-{i}", "text": t, "label": lab, "domain": domain}
        for i, (t, lab) in enumerate(TICKETS)
    ]
    served: list[dict] = []
    with BackgroundLoad(stack.url, {"text": TICKETS[0][0], "domain": domain}, served.append) as load:
        send_feedback(producer, stack.settings.feedback_topic, rows)
        # Promote the learner's first candidate as an operator would (the rollout gate is not under test;
        # the rollout controller may be moving it through shadow and canary, or have promoted it already).
        redis_cfg = stack.settings.redis()
        registry = RegistryStore(connect(redis_cfg), redis_cfg)
        live = {"candidate", "shadow", "canary", "promoted"}
        candidate = wait_for(
            lambda: next((r.version for r in registry.versions(domain) if r.state in live), None),
            180,
            interval=0.2,
            what="a candidate adapter",
        )
        with contextlib.suppress(RegistryConflict):  # promoted by the controller meanwhile
            registry.promote(domain, candidate, actor="test", reason="operator promotion")
        assert registry.active()[domain] == candidate
        wait_for(lambda: served and served[-1]["adapter"] == candidate, 30, interval=0.1, what="it served")
        parent = candidate
        entries_before = client.get("/healthz").json()["memory_entries"]
        cfg = TransferConfig(synthetic_per_example=1, train=TrainConfig(epochs=1, max_steps=8, batch_size=8))
        report = migrate_base(stack.settings, tiny_model_dir, domains=[domain], cfg=cfg)
        answered_during = load.answered
    assert load.failures == [] and answered_during > 0
    # Serving never left the old base or its memory.
    old_base = served[0]["model_version"].split("/")[0]
    assert all(a["model_version"].split("/")[0] == old_base for a in served)
    assert served[-1]["adapter"] == parent
    assert client.get("/healthz").json()["memory_entries"] >= entries_before  # no generation switch

    new_fp = model_fingerprint(tiny_model_dir)
    assert report.to_fingerprint == new_fp != report.from_fingerprint
    assert report.from_fingerprint[:12] == old_base
    assert report.memory is not None and report.memory.added >= len(rows)
    rekeyed = MemoryLog(connect(redis_cfg), redis_cfg, new_fp)
    assert rekeyed.generation == report.memory.generation
    mine = [e for e in rekeyed.iter_all() if e.domain == domain]
    assert len(mine) == len(rows) and all(e.embedding.shape == (32,) for e in mine)
    assert {e.model_version for e in mine} == {new_fp[:12]}

    moved = report.adapters[domain]
    assert moved["parent"] == parent
    artifact = load_artifact(
        stack.settings.artifacts_dir / domain / moved["version"], base_fingerprint=new_fp, dim=32
    )
    assert artifact.manifest.parent == parent and sorted(artifact.head.labels) == ["billing", "bug"]
    plan = json.loads(Path(report.plan).read_text())
    assert plan["to_fingerprint"] == new_fp and plan["adapters"][domain]["version"] == moved["version"]
