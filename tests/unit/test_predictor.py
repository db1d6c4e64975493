"""The Predictor on a tiny real BERT: prototype head, open label set, adapter hot-swap under load."""

from __future__ import annotations

import threading

import pytest

from learners import artifacts
from learners.trainer import TrainConfig, train_adapter
from serving.artifacts import load_artifact
from serving.compensator import CompensationConfig
from serving.memory import InProcessMemory
from serving.predictor import Predictor
from streams.redis_store import MemoryEntry
from streams.schemas import ArtifactManifest


def _remember(predictor: Predictor, rows: list[tuple[str, str]], domain: str = "d") -> None:
    keys = predictor.embed([t for t, _ in rows])
    predictor.memory.add(
        [MemoryEntry(f"{domain}-{i}-{t}", domain, lab, keys[i], 0.0, "v") for i, (t, lab) in enumerate(rows)]
    )


@pytest.fixture()
def predictor(tiny_encoder):
    return Predictor(tiny_encoder, InProcessMemory(tiny_encoder.dim), CompensationConfig())


def test_unknown_domain_has_no_label(predictor):
    (p,) = predictor.predict(["anything"], ["nobody"])
    assert p.label is None and p.scores == {} and p.adapter is None


def test_feedback_makes_a_new_label_predictable(predictor):
    _remember(predictor, [("the cat sat", "cats"), ("stock prices fell", "finance")])
    (before,) = predictor.predict(["a brand new topic about volcanoes"], ["d"])
    assert before.label in {"cats", "finance"}
    _remember(predictor, [("a brand new topic about volcanoes", "geology")])
    (after,) = predictor.predict(["a brand new topic about volcanoes"], ["d"])
    assert after.label == "geology" and after.compensated


def test_texts_and_domains_must_align(predictor):
    with pytest.raises(ValueError):
        predictor.predict(["a", "b"], ["d"])


def _artifact(tmp_path, encoder, version, parent=None):
    texts = ["good thing", "bad thing", "great stuff", "awful stuff"] * 2
    labels = ["pos", "neg", "pos", "neg"] * 2
    trained = train_adapter(encoder, texts, labels, TrainConfig(epochs=1, batch_size=4), parent=parent)
    manifest = ArtifactManifest(
        domain="d", version=version, base_fingerprint=encoder.fingerprint, labels=trained.labels, files={}
    )
    path = artifacts.publish(tmp_path, manifest, trained.write)
    return load_artifact(path, base_fingerprint=encoder.fingerprint, dim=encoder.dim)


def test_hot_swap_under_concurrent_requests(tmp_path, predictor, tiny_encoder):
    v1 = _artifact(tmp_path, tiny_encoder, "v1")
    v2 = _artifact(tmp_path, tiny_encoder, "v2", parent=v1)
    predictor.activate(v1)
    seen: set[str | None] = set()
    errors: list[BaseException] = []
    stop = threading.Event()

    def load():
        while not stop.is_set():
            try:
                (p,) = predictor.predict(["good thing"], ["d"])
                seen.add(p.adapter)
            except BaseException as exc:
                errors.append(exc)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for w in workers:
        w.start()
    for _ in range(5):
        predictor.activate(v2)
        predictor.activate(v1)
    predictor.activate(v2)
    stop.set()
    for w in workers:
        w.join()
    assert errors == []
    assert {"v1", "v2"} <= seen
    assert tiny_encoder.adapters == ["d@v2"]  # old versions are unloaded, not accumulated
    predictor.deactivate("d")
    assert tiny_encoder.adapters == []
