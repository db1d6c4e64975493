"""The Predictor on a tiny real BERT: prototype head, open label set, adapter hot-swap under load."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from learners import artifacts
from learners.trainer import TrainConfig, train_adapter
from serving.artifacts import load_artifact
from serving.compensator import CompensationConfig
from serving.memory import InProcessMemory
from serving.mixing import ServedMix
from serving.predictor import AdapterCachePolicy, Predictor, RetrievalConfig, adapter_name, ranked
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
    assert tiny_encoder.adapters == [adapter_name(v2)]  # old versions are unloaded, not accumulated
    predictor.deactivate("d")
    assert tiny_encoder.adapters == []


def test_adapter_lru_evicts_reloads_on_demand_and_keeps_pinned(tmp_path, tiny_encoder):
    predictor = Predictor(
        tiny_encoder,
        InProcessMemory(tiny_encoder.dim),
        CompensationConfig(enabled=False),
        AdapterCachePolicy(max_loaded=2, pinned=frozenset({"a"})),
    )
    texts = ["good thing", "bad thing", "great stuff", "awful stuff"] * 2
    labels = ["pos", "neg", "pos", "neg"] * 2
    arts = {}
    for domain in ("a", "b", "c"):
        trained = train_adapter(
            tiny_encoder, texts, labels, TrainConfig(epochs=1, batch_size=4, seed=ord(domain))
        )
        manifest = ArtifactManifest(
            domain=domain,
            version="v1",
            base_fingerprint=tiny_encoder.fingerprint,
            labels=trained.labels,
            files={},
        )
        path = artifacts.publish(tmp_path, manifest, trained.write)
        arts[domain] = load_artifact(path, base_fingerprint=tiny_encoder.fingerprint, dim=tiny_encoder.dim)
        predictor.activate(arts[domain])
    expected = {d: predictor.predict(["good thing"], [d])[0].scores for d in "abc"}
    assert len(predictor.loaded_adapters()) == 2
    assert adapter_name(arts["a"]) in predictor.loaded_adapters()  # pinned, never evicted
    for domain in "bcbcab":
        (p,) = predictor.predict(["good thing"], [domain])
        assert p.adapter == "v1" and p.scores == expected[domain]  # reloaded weights answer the same
        assert len(predictor.loaded_adapters()) <= 2
        assert adapter_name(arts["a"]) in predictor.loaded_adapters()
    for domain in "abc":
        predictor.deactivate(domain)
    assert tiny_encoder.adapters == []


def _vec(*xs: float) -> np.ndarray:
    v = np.zeros(32, dtype=np.float32)
    v[: len(xs)] = xs
    return v / np.linalg.norm(v)


def test_retrieval_routes_to_the_domain_owning_the_nearest_class(tiny_encoder):
    mem = InProcessMemory(32)
    entries = [
        ("a1", "a", "cat", _vec(1, 0, 0, 0.1)),
        ("a2", "a", "dog", _vec(1, 0, 0, -0.1)),
        ("b1", "b", "stock", _vec(0, 1, 0)),
        ("b2", "b", "bond", _vec(0.5, 1, 0)),
    ]
    mem.add([MemoryEntry(i, d, lab, v, 0.0, "v") for i, d, lab, v in entries])
    predictor = Predictor(tiny_encoder, mem, CompensationConfig(), retrieval=RetrievalConfig(candidates=2))
    assert predictor.route(_vec(0.1, 1, 0))[0] == "b"
    assert predictor.route(_vec(1, 0.05, 0))[0] == "a"
    # Domain "c" has classes along two axes; its centroid is nearest to this key, but the nearest class
    # belongs to "d": the refinement moves the request there.
    mem.add(
        [
            MemoryEntry("c1", "c", "x", _vec(0, 0, 0, 0, 1), 0.0, "v"),
            MemoryEntry("c2", "c", "y", _vec(0, 0, 0, 0, 0, 1), 0.0, "v"),
            MemoryEntry("d1", "d", "z", _vec(0, 0, 0, 0, 0.6, 0.8), 0.0, "v"),
        ]
    )
    key = _vec(0, 0, 0, 0, 0.7, 0.714)
    names, cents = mem.domain_centroids()
    assert names[int(np.argmax(cents @ key))] == "c"
    assert predictor.route(key)[0] == "d"
    assert predictor.route(_vec(0, 0, 1))[0] == "default"  # nothing similar: fall back
    off = Predictor(tiny_encoder, mem, CompensationConfig(), retrieval=RetrievalConfig(enabled=False))
    assert off.route(_vec(0, 1, 0))[0] == "default"


def _route_reference(mem, cfg, key):
    """The routing rule spelled out one request at a time: nearest domain keys, then the candidate that
    owns the nearest class mean (first in centroid order on a tie)."""
    names, cents = mem.domain_centroids()
    sims = cents @ key
    order = np.argsort(-sims, kind="stable")[: cfg.candidates]
    if sims[order[0]] < cfg.min_similarity:
        return "default", float(sims[order[0]])
    best, best_sim = names[order[0]], -np.inf
    for i in order:
        top = float((mem.class_means(names[i])[1] @ key).max())
        if top > best_sim:
            best, best_sim = names[i], top
    return best, float(sims[names.index(best)])


def test_batched_routing_matches_the_rule_request_by_request(tiny_encoder):
    rng = np.random.default_rng(4)
    centres = rng.normal(size=(12, 32))
    mem = InProcessMemory(32)
    entries = []
    for i in range(600):
        dom = i % 12
        v = centres[dom] + rng.normal(size=32) * 1.2
        entries.append(MemoryEntry(f"e{i}", f"d{dom}", f"c{dom}-{i % 5}", _vec(*v), 0.0, "v"))
    mem.add(entries)
    cfg = RetrievalConfig(candidates=4, min_similarity=0.25)
    predictor = Predictor(tiny_encoder, mem, CompensationConfig(), retrieval=cfg)
    keys = np.stack([_vec(*(centres[i % 12] + rng.normal(size=32) * 2.5)) for i in range(64)])
    keys[:8] = np.stack([_vec(*rng.normal(size=32)) for _ in range(8)])  # some fall back
    routed = predictor.route_batch(keys)
    expected = [_route_reference(mem, cfg, k) for k in keys]
    assert [d for d, _ in routed] == [d for d, _ in expected]
    np.testing.assert_allclose([s for _, s in routed], [s for _, s in expected], rtol=1e-5, atol=1e-6)
    # A few rows at a time (fewer candidate domains per call) give the same answers.
    few = [d for i in range(0, len(keys), 2) for d, _ in predictor.route_batch(keys[i : i + 2])]
    assert few == [d for d, _ in expected]
    assert any(d == "default" for d, _ in routed) and len({d for d, _ in routed}) > 5
    # the refinement moved some requests away from their nearest domain key
    names, cents = mem.domain_centroids()
    nearest = [names[int(np.argmax(cents @ k))] for k in keys]
    assert any(d != n and d != "default" for (d, _), n in zip(routed, nearest, strict=True))
    assert predictor.route_batch(keys[:0]) == []


def test_canary_serves_its_weight_and_keeps_the_stable_answer(tmp_path, predictor, tiny_encoder):
    stable = _artifact(tmp_path, tiny_encoder, "v1")
    candidate = _artifact(tmp_path, tiny_encoder, "v2", parent=stable)
    predictor.activate(stable)
    predictor.set_rollout(candidate, "canary", weight=0.3)
    ids = [f"req-{i}" for i in range(400)]
    preds = predictor.predict(["good thing"] * len(ids), ["d"] * len(ids), ids)
    canary = [p for p in preds if p.variant == "canary"]
    assert all(p.adapter == "v2" and p.stable_label is not None for p in canary)
    assert all(p.adapter == "v1" for p in preds if p.variant == "stable")
    # binomial(400, 0.3): mean 120, sd 9.2; 99.9% within +-31
    assert 89 <= len(canary) <= 151
    again = predictor.predict(["good thing"] * 50, ["d"] * 50, ids[:50])
    assert [p.variant for p in again] == [p.variant for p in preds[:50]]  # a retry lands alike
    predictor.clear_rollout("d")
    after = predictor.predict(["good thing"] * 100, ["d"] * 100, ids[:100])
    assert {p.adapter for p in after} == {"v1"}
    assert adapter_name(candidate) not in predictor.loaded_adapters()


def test_a_failing_canary_serves_the_stable_answer(tmp_path, predictor, tiny_encoder, monkeypatch):
    stable = _artifact(tmp_path, tiny_encoder, "v1")
    candidate = _artifact(tmp_path, tiny_encoder, "v2", parent=stable)
    predictor.activate(stable)
    predictor.set_rollout(candidate, "canary", weight=1.0)
    real = tiny_encoder.encode

    def broken(texts, adapter=None):
        if adapter == adapter_name(candidate):
            raise RuntimeError("CUDA error: device-side assert")
        return real(texts, adapter=adapter)

    monkeypatch.setattr(tiny_encoder, "encode", broken)
    (p,) = predictor.predict(["good thing"], ["d"], ["r1"])
    assert p.adapter == "v1" and p.variant == "stable" and p.canary_error == "RuntimeError"


def test_shadow_marks_mirrored_requests_and_answers_off_path(tmp_path, predictor, tiny_encoder):
    candidate = _artifact(tmp_path, tiny_encoder, "v1")
    predictor.set_rollout(candidate, "shadow", shadow_share=0.5)
    ids = [f"s-{i}" for i in range(200)]
    preds = predictor.predict(["good thing"] * 200, ["d"] * 200, ids)
    mirrored = [p for p in preds if p.shadow]
    assert 60 <= len(mirrored) <= 140
    assert all(p.adapter is None and p.variant == "stable" for p in preds)  # users never see the shadow
    keys = np.stack([p.key for p in mirrored[:3]])
    answers = predictor.shadow("d", ["good thing"] * 3, keys)
    assert answers is not None and {a.adapter for a in answers} == {"v1"}
    predictor.clear_rollout("d")
    assert predictor.shadow("d", ["good thing"], keys[:1]) is None


def test_a_new_version_with_identical_lora_weights_still_swaps(tmp_path, predictor, tiny_encoder):
    """Two versions may share LoRA weights (only the head changed): the new one must still be served."""
    v1 = _artifact(tmp_path, tiny_encoder, "v1")
    v2 = _artifact(tmp_path, tiny_encoder, "v2")
    assert adapter_name(v1) == adapter_name(v2)  # same seed, same data: same LoRA file
    predictor.activate(v1)
    predictor.set_rollout(v2, "canary", weight=0.5)
    predictor.activate(v2)  # promoted
    predictor.clear_rollout("d")
    (p,) = predictor.predict(["good thing"], ["d"], ["r"])
    assert p.adapter == "v2" and predictor.loaded_adapters() == [adapter_name(v2)]


def test_an_adapter_raises_the_compensation_floor_never_lowers_it():
    from types import SimpleNamespace

    from serving.compensator import CompensationConfig
    from serving.predictor import compensation_for

    comp = CompensationConfig(sim_low=0.6, sim_high=0.95)

    def art(**metrics):
        return SimpleNamespace(manifest=SimpleNamespace(metrics=metrics))

    assert compensation_for(comp, None) is comp
    assert compensation_for(comp, art()) is comp
    assert compensation_for(comp, art(compensation_sim_low=0.8)).sim_low == 0.8
    assert compensation_for(comp, art(compensation_sim_low=0.5)) is comp  # never below the deployment's
    assert compensation_for(comp, art(compensation_sim_low=0.95)) is comp  # never at or past sim_high


def _served_weight(p) -> float:
    """The memory weight an answer was mixed at, from its scores and the two distributions it records."""
    mix = ServedMix.from_json(p.mix)
    lab = max(mix.head, key=lambda k: abs(mix.head[k] - mix.memory.get(k, 0.0)))
    head, mem = mix.head[lab], mix.memory.get(lab, 0.0)
    return (p.scores.get(lab, 0.0) - head) / (mem - head)


def test_labelled_answers_teach_the_served_mix_and_a_forget_undoes_it(tmp_path, tiny_encoder):
    predictor = Predictor(tiny_encoder, InProcessMemory(tiny_encoder.dim), CompensationConfig(enabled=False))
    predictor.activate(_artifact(tmp_path, tiny_encoder, "v1"))
    _remember(predictor, [("good thing", "neg"), ("bad thing", "pos"), ("great stuff", "neg")])
    (before,) = predictor.predict(["good thing"], ["d"])
    served = ServedMix.from_json(before.mix)
    assert served is not None and served.adapter == "v1" and set(served.head) == {"pos", "neg"}
    assert _served_weight(before) == pytest.approx(0.5, abs=1e-4)  # the artifact's (default) weight
    # Labelled answers of v1 in which the head gave the true label far more than the memory did.
    key = predictor.embed(["an unrelated sentence about trains"])[0]
    judged = [
        MemoryEntry(f"j{i}", "d", "pos", key, 1.0, "v", mix=("v1", 0.9, 0.1, 0.0, 0.0, 0.0))
        for i in range(40)
    ]
    predictor.memory.add(judged)
    (after,) = predictor.predict(["good thing"], ["d"])
    learned, n = predictor.memory.mixing.weight("d", "v1", 0.5)
    assert n == 40 and learned < 0.1
    assert _served_weight(after) == pytest.approx(learned, abs=1e-4)
    predictor.memory.remove([e.event_id for e in judged])
    (forgotten,) = predictor.predict(["good thing"], ["d"])
    assert _served_weight(forgotten) == pytest.approx(0.5, abs=1e-4)


def test_a_learned_compensation_scale_damps_mere_neighbours_never_near_duplicates(tiny_encoder):
    predictor = Predictor(tiny_encoder, InProcessMemory(tiny_encoder.dim), CompensationConfig())
    query = predictor.embed(["where is my parcel"])[0].astype(np.float64)
    rng = np.random.default_rng(0)

    def at(cos: float) -> np.ndarray:  # a unit key at this cosine similarity to the query
        r = rng.normal(size=query.shape)
        r -= (r @ query) * query
        return (cos * query + np.sqrt(1 - cos**2) * r / np.linalg.norm(r)).astype(np.float32)

    def entry(i: int, cos: float, label: str, mix=None) -> MemoryEntry:
        return MemoryEntry(f"e{i}", "d", label, at(cos), float(i), "v", mix=mix)

    predictor.memory.add([entry(0, 0.8, "late"), entry(1, 0.3, "lost")])
    (before,) = predictor.predict(["where is my parcel"], ["d"])
    raw = 0.9 * (0.8 - 0.6) / (0.95 - 0.6)  # lambda_max * (top - sim_low) / (sim_high - sim_low)
    assert before.blend == pytest.approx(raw, abs=1e-3)
    # Labels of memory-only answers in this domain whose neighbours pointed the wrong way.
    misled = [entry(10 + i, 0.1, "lost", mix=("", None, None, raw, 0.8, 0.1)) for i in range(200)]
    predictor.memory.add(misled)
    scale, n = predictor.memory.mixing.comp_scale("d", "")
    assert n == 200 and scale < 0.2
    (damped,) = predictor.predict(["where is my parcel"], ["d"])
    assert damped.blend == pytest.approx(scale * raw, abs=1e-3)
    predictor.memory.add([entry(500, 0.99, "refund")])  # a near-duplicate keeps the full blend
    (fixed,) = predictor.predict(["where is my parcel"], ["d"])
    assert fixed.blend == pytest.approx(0.9) and fixed.label == "refund"


def test_scores_are_ranked_highest_first_with_ties_in_vocabulary_order():
    vocab = ["a", "b", "c", "d"]
    probs = np.array(
        [
            [0.1, 0.4, 0.1, 0.4],  # ties: vocabulary order
            [0.0, 0.0, 1.0, 0.0],  # zeros left out
            [0.0, 0.0, 0.0, 0.0],  # nothing probable: no label
            [0.25000001, 0.25, 0.2, 0.3],  # equal once rounded to 6 places
        ]
    )
    assert ranked(vocab, probs, 4) == [
        ("b", {"b": 0.4, "d": 0.4, "a": 0.1, "c": 0.1}),
        ("c", {"c": 1.0}),
        (None, {}),
        ("d", {"d": 0.3, "a": 0.25, "b": 0.25, "c": 0.2}),
    ]
    orders = [list(s) for _, s in ranked(vocab, probs, 4)]  # dict equality above ignores the order
    assert orders == [["b", "d", "a", "c"], ["c"], [], ["d", "a", "b", "c"]]
    assert ranked([], np.zeros((2, 0)), 2) == [(None, {}), (None, {})]
    rng = np.random.default_rng(0)
    many = np.round(rng.dirichlet(np.ones(12), size=50), 2)  # many ties
    labels = [f"l{j}" for j in range(12)]
    for (label, scores), row in zip(ranked(labels, many, 50), many.tolist(), strict=True):
        expect = sorted(((labels[j], p) for j, p in enumerate(row) if p > 0), key=lambda kv: -kv[1])
        assert list(scores.items()) == expect and label == labels[int(np.argmax(row))]
