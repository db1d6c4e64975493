"""Safe rollout on the embedded stack: the rollout controller process, two Serve replicas, Redis, Kafka.

Candidates are real LoRA adapters trained on MiniLM and evaluated with serving's own predictor; the bad
ones are real defects (NaN weights, a wrong head shape, a pickle file, a tampered file, flipped labels,
a regression on a sub-topic), not flags.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from kafka import KafkaConsumer
from safetensors.torch import load_file, save_file

from learners import artifacts
from learners.buffer import Example
from learners.evaluation import evaluate_candidate
from learners.trainer import TrainConfig, TrainedAdapter, train_adapter
from ops.stack import settings_env
from serving.artifacts import HEAD_FILE, MANIFEST, load_artifact, sha256_file
from serving.encoder import Encoder
from serving.predictor import pick
from streams.redis_store import MemoryEntry
from streams.registry_store import RegistryConflict, StaleEvaluation
from streams.schemas import ArtifactManifest
from tests.conftest import wait_for
from tests.integration.conftest import (
    ADMIN_TOKEN,
    CANARY_FAILURE_THRESHOLD,
    CANARY_INTERVAL_S,
    assert_shadow_then_canary,
)

BILLING = [
    "I was charged twice",
    "My card was billed again",
    "The invoice amount is wrong",
    "I need a refund for the payment",
    "You took money after I cancelled",
    "The subscription fee doubled",
    "There is an unknown charge on my statement",
    "My bank shows two payments",
]
BUG = [
    "The app crashes on start",
    "Clicking save does nothing",
    "The export gives an empty file",
    "Search returns no results",
    "The page freezes when I scroll",
    "Login button is unresponsive",
    "Images fail to load in the gallery",
    "The settings screen is blank",
]
TAILS = [
    "this morning",
    "since the update",
    "for the third time",
    "on my account",
    "again today",
    "last week",
]
WORDS = [
    *("river", "orange", "planet", "window", "silver", "garden", "engine", "pocket", "yellow", "forest"),
    *("candle", "mirror", "bridge", "winter", "copper", "island", "ladder", "violin", "desert", "harbor"),
    *("pepper", "marble", "rocket", "saddle", "thunder", "velvet", "walnut", "zebra"),
]
AUTH = {"authorization": f"Bearer {ADMIN_TOKEN}"}


def _examples(subjects: dict[str, list[str]], prefix: str) -> list[Example]:
    rows = [(f"{s} {t}", label) for label, subj in subjects.items() for s in subj for t in TAILS]
    random.Random(prefix).shuffle(rows)
    return [Example(f"{prefix}-{i}", text, label, float(i)) for i, (text, label) in enumerate(rows)]


@dataclass
class Candidates:
    encoder: Encoder
    train: list[Example]
    hold: list[Example]
    memory: list[MemoryEntry]
    good: TrainedAdapter
    good_next: TrainedAdapter
    flipped: TrainedAdapter
    regressed: TrainedAdapter


@pytest.fixture(scope="module")
def candidates() -> Candidates:
    """Adapters trained once; each test writes them as artifacts of its own domains."""
    encoder = Encoder()
    # Held-out subjects are phrasings the training data never has, so the adapter's own answer counts.
    train = _examples({"billing": BILLING[:6], "bug": BUG[:6]}, "train")
    hold = _examples({"billing": BILLING[6:], "bug": BUG[6:]}, "hold")
    keys = encoder.encode([e.text for e in train])
    memory = [MemoryEntry(e.event_id, "gate", e.label, keys[i], e.ts, "v") for i, e in enumerate(train)]
    cfg = TrainConfig(epochs=2, max_steps=12)
    texts, labels = [e.text for e in train], [e.label for e in train]
    good = train_adapter(encoder, texts, labels, cfg)
    flip = {"billing": "bug", "bug": "billing"}
    flipped = train_adapter(encoder, texts, [flip[lab] for lab in labels], cfg)
    # A regression on half of the sub-topics: plausible overall, many negative flips.
    confused = tuple(BILLING[3:6] + BUG[3:6])
    regressed = train_adapter(
        encoder, texts, [flip[e.label] if e.text.startswith(confused) else e.label for e in train], cfg
    )
    # The next version continues from the published one on the same window plus its held-out data.
    with tempfile.TemporaryDirectory() as tmp:
        manifest = ArtifactManifest(
            domain="gate",
            version="v-base",
            base_fingerprint=encoder.fingerprint,
            labels=good.labels,
            files={},
        )
        parent = load_artifact(
            artifacts.publish(tmp, manifest, good.write),
            base_fingerprint=encoder.fingerprint,
            dim=encoder.dim,
        )
        good_next = train_adapter(encoder, texts, labels, cfg, parent=parent)
    return Candidates(encoder, train, hold, memory, good, good_next, flipped, regressed)


class Placer:
    """Writes trained adapters as artifacts of a domain and evaluates them like the learner does."""

    def __init__(self, stack, registry, c: Candidates) -> None:
        self.root = stack.settings.artifacts_dir
        self.registry = registry
        self.c = c

    def place(self, domain: str, trained: TrainedAdapter, parent: str | None = None, tamper=None) -> str:
        version = f"v-{domain}-{uuid.uuid4().hex[:6]}"
        manifest = ArtifactManifest(
            domain=domain,
            version=version,
            parent=parent,
            base_fingerprint=self.c.encoder.fingerprint,
            labels=trained.labels,
            files={},
        )
        staged = artifacts.stage(self.root, manifest, trained.write)
        if tamper is not None:
            tamper(staged)
        artifacts.commit(staged)
        return version

    def report(self, domain: str, version: str, parent: str | None) -> dict[str, float]:
        enc = self.c.encoder

        def load(v: str):
            return load_artifact(self.root / domain / v, base_fingerprint=enc.fingerprint, dim=enc.dim)

        memory = [
            MemoryEntry(m.event_id, domain, m.label, m.embedding, m.ts, m.model_version)
            for m in self.c.memory
        ]
        return evaluate_candidate(
            enc,
            _comp(),
            domain,
            load(version),
            load(parent) if parent else None,
            self.c.train,
            self.c.hold,
            memory,
        )

    def submit(
        self,
        domain: str,
        version: str,
        report: dict[str, float],
        parent: str | None = None,
        evaluated_against: str | None = None,
    ) -> None:
        self.registry.submit_candidate(
            domain,
            version,
            parent=parent,
            metrics=report,
            reason="test candidate",
            evaluated_against=evaluated_against,
        )

    def bootstrap(self, domain: str, trained: TrainedAdapter) -> str:
        """A promoted starting version, as an operator would set one (never a waiting candidate, which the
        running controller would gate, and reject for want of an evaluation)."""
        version = self.place(domain, trained)
        self.registry.install(domain, version, parent=None, actor="test", reason="bootstrap")
        return version


def _comp():
    from serving.compensator import CompensationConfig

    return CompensationConfig()


def _rehash(staged: Path) -> None:
    """Rewrite the manifest's hashes, so only the defect itself can give a file away."""
    manifest = ArtifactManifest.model_validate_json((staged / MANIFEST).read_text())
    files = {
        p.relative_to(staged).as_posix(): sha256_file(p)
        for p in sorted(staged.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    (staged / MANIFEST).write_text(manifest.model_copy(update={"files": files}).model_dump_json())


def _nan_weights(staged: Path) -> None:
    head = load_file(str(staged / HEAD_FILE))
    head["weight"][0, 0] = float("nan")
    save_file(head, str(staged / HEAD_FILE))
    _rehash(staged)


def _wrong_shape(staged: Path) -> None:
    head = load_file(str(staged / HEAD_FILE))
    head["weight"] = head["weight"][:, :-1].contiguous()
    save_file(head, str(staged / HEAD_FILE))
    _rehash(staged)


def _pickle_file(staged: Path) -> None:
    import pickle

    (staged / "adapter" / "optimizer.bin").write_bytes(pickle.dumps({"state": [1, 2, 3]}))
    _rehash(staged)


def _tampered(staged: Path) -> None:
    with (staged / HEAD_FILE).open("r+b") as fh:
        fh.seek(-4, os.SEEK_END)
        fh.write(b"\x00\x00\x80\x7f")  # changed after the manifest was written


class Load:
    """Requests on several domains from two threads; every answer kept with its send time."""

    def __init__(self, url: str, domains: list[str], texts=None) -> None:
        self.url, self.domains = url, domains
        self.texts = texts or (lambda rng: " ".join(rng.choice(WORDS) for _ in range(8)))
        self.answers: list[tuple[float, str, dict]] = []
        self.failures: list[str] = []
        self.on_answer = None
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(2)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=30) as c:
            while not self._stop.is_set():
                domain = self.domains[rng.randrange(len(self.domains))]
                text = self.texts(rng)
                sent = time.time()
                r = c.post("/v1/predict", json={"text": text, "domain": domain})
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text}")
                    continue
                answer = {**r.json(), "text": text, "replica": r.headers.get("x-driftserve-replica")}
                self.answers.append((sent, domain, answer))
                if self.on_answer is not None:
                    self.on_answer(answer)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def _state(registry, domain: str, version: str) -> str | None:
    record = registry.get(domain, version)
    return None if record is None else record.state


def _rollout_decisions(stack, want: set[tuple[str, str]], timeout_s: float = 30.0) -> set[tuple[str, str]]:
    """(domain, type) of records on the rollout topic, read until ``want`` is all there or the time is up.
    (The topic never goes quiet while other rollouts are in flight, so "until idle" is no end.)"""
    consumer = KafkaConsumer(
        stack.settings.rollout_topic,
        bootstrap_servers=stack.settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    seen: set[tuple[str, str]] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while not want <= seen and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                seen |= {(e["domain"], e["type"]) for e in (json.loads(m.value) for m in records)}
        return seen
    finally:
        consumer.close()


def test_bad_candidates_are_blocked_and_good_ones_promoted(stack, registry, candidates, client):
    placer = Placer(stack, registry, candidates)
    c = candidates
    good = placer.place("gate-good", c.good)
    good_base = placer.bootstrap("gate-good-next", c.good)
    good_next = placer.place("gate-good-next", c.good_next, parent=good_base)
    bad = {
        "gate-nan": (placer.place("gate-nan", c.good, tamper=_nan_weights), "non_finite"),
        "gate-shape": (placer.place("gate-shape", c.good, tamper=_wrong_shape), "shape_mismatch"),
        "gate-pickle": (placer.place("gate-pickle", c.good, tamper=_pickle_file), "forbidden_file"),
        "gate-hash": (placer.place("gate-hash", c.good, tamper=_tampered), "hash_mismatch"),
        "gate-flip": (placer.place("gate-flip", c.flipped), "adapter"),
        "gate-nfr": (placer.place("gate-nfr", c.regressed), "adapter"),
    }
    good_report = placer.report("gate-good", good, None)
    reports = {
        "gate-good": good_report,
        "gate-good-next": placer.report("gate-good-next", good_next, good_base),
        # A defective file cannot be evaluated; the good adapter's report shows the gate is not fooled by it.
        **{d: good_report for d in ("gate-nan", "gate-shape", "gate-pickle", "gate-hash")},
        "gate-flip": placer.report("gate-flip", bad["gate-flip"][0], None),
        "gate-nfr": placer.report("gate-nfr", bad["gate-nfr"][0], None),
    }
    print("evaluation reports:", json.dumps(reports, indent=1))
    # With the memory beside them their served answers may be fine: the heads alone give them away.
    assert reports["gate-nfr"]["adapter_nfr"] > 0.05 and reports["gate-flip"]["adapter_accuracy"] < 0.5
    gate_text = lambda rng: f"{rng.choice(BILLING + BUG)} {rng.choice(TAILS)}"  # noqa: E731
    with Load(stack.url, ["gate-good", "gate-good-next", *bad], gate_text) as load:
        order = [("gate-nan", None), ("gate-good", None), ("gate-flip", None), ("gate-shape", None)]
        order += [
            ("gate-good-next", good_base),
            ("gate-pickle", None),
            ("gate-hash", None),
            ("gate-nfr", None),
        ]
        versions = {"gate-good": good, "gate-good-next": good_next} | {d: v for d, (v, _) in bad.items()}
        for domain, parent in order:
            placer.submit(domain, versions[domain], reports[domain], parent=parent)
        wait_for(
            lambda: all(_state(registry, d, v) == "rejected" for d, (v, _) in bad.items()),
            60,
            interval=0.2,
            what="every bad candidate rejected",
        )
        wait_for(
            lambda: (
                registry.active().get("gate-good") == good
                and registry.active().get("gate-good-next") == good_next
            ),
            120,
            interval=0.2,
            what="both good candidates promoted",
        )
    assert load.failures == []
    active = registry.active()
    for domain, (version, why) in bad.items():
        record = registry.get(domain, version)
        assert record.state == "rejected" and why in record.reason, (domain, record.reason)
        assert active.get(domain) is None
        served = {a["adapter"] for _, d, a in load.answers if d == domain}
        assert served == {None}, f"{domain} answered by {served}"
    assert registry.get("gate-good-next", good_base).state == "retired"
    assert registry.lineage("gate-good-next", good_next)[1].version == good_base
    events = [e for e in registry.audit("gate-good") if e.version == good]
    assert_shadow_then_canary(events)
    assert events[-1].type == "promoted"
    want = {("gate-good", "promoted"), ("gate-good-next", "promoted")} | {(d, "rejected") for d in bad}
    assert want <= _rollout_decisions(stack, want), "decisions missing on the Kafka rollout topic"
    metrics_text = client.get("/metrics").text
    assert 'driftserve_gate_checks_total{check="integrity",result="fail"}' in metrics_text
    print(f"gate: {len(bad)} bad candidates rejected, 2 good promoted, {len(load.answers)} answers, 0 failed")


def test_a_shadow_without_traffic_is_extended_until_it_can_be_judged(stack, registry, candidates):
    """A shadow that mirrored nothing (an idle domain) does not hand its candidate to a canary: it waits,
    audited once, and the canary starts only after mirrored traffic let the shadow pass."""
    placer = Placer(stack, registry, candidates)
    domain = f"idle-shadow-{uuid.uuid4().hex[:6]}"
    version = placer.place(domain, candidates.good)
    placer.submit(domain, version, placer.report(domain, version, None))

    def analyses() -> list:
        return [e for e in registry.audit(domain) if e.version == version and e.type == "analysis"]

    wait_for(lambda: len(analyses()) == 1, 30, 0.1, "the shadow's extension")
    # Nothing may happen while no request comes: several more shadow lengths, still one record, still shadow.
    time.sleep(stack.settings.shadow_seconds * 3)
    assert _state(registry, domain, version) == "shadow"
    assert len(analyses()) == 1 and analyses()[0].reason.endswith("shadow extended"), analyses()
    with Load(stack.url, [domain]) as load:
        wait_for(
            lambda: _state(registry, domain, version) in {"canary", "promoted"},
            60,
            0.1,
            "the canary once the shadow had traffic",
        )
    assert load.failures == []
    assert_shadow_then_canary([e for e in registry.audit(domain) if e.version == version])


def test_canary_that_breaks_is_rolled_back_within_its_interval_budget(stack, registry, candidates, client):
    """The canary serves its weight (checked while paused), then its answers turn out wrong on live
    feedback; after ``threshold`` failed intervals all traffic returns to the promoted version."""
    placer = Placer(stack, registry, candidates)
    domain = "canary-break"
    stable = placer.bootstrap(domain, candidates.good)
    candidate = placer.place(domain, candidates.flipped)
    weight = stack.settings.canary_weight
    labelled: list[float] = []
    producer_lock = threading.Lock()
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=stack.settings.kafka_bootstrap, acks="all")
    break_at: list[float] = []

    def label_it(answer: dict) -> None:
        if not break_at or answer["domain"] != domain or not answer["label"]:
            return
        # Ground truth of live traffic: the canary's answers are wrong, the stable ones right.
        truth = answer["label"]
        if answer["adapter"] == candidate:
            truth = "bug" if answer["label"] == "billing" else "billing"
        event = {
            "event_id": f"cb-{answer['request_id']}",
            "text": answer["text"],
            "label": truth,
            # The controller joins labels by request id. Another domain keeps these random texts out of
            # the domain's error memory and keeps the learner from rolling out its own adapter here.
            "domain": f"{domain}-labels",
            "request_id": answer["request_id"],
        }
        with producer_lock:
            producer.send(
                stack.settings.feedback_topic, key=domain.encode(), value=json.dumps(event).encode()
            )
        labelled.append(time.time())

    try:
        with Load(stack.url, [domain]) as load:
            load.on_answer = label_it
            placer.submit(
                domain,
                candidate,
                {
                    "holdout_size": 10.0,
                    "holdout_accuracy": 1.0,
                    "current_accuracy": 1.0,
                    "nfr": 0.0,
                    "ece": 0.0,
                    "current_ece": 0.0,
                },
                parent=stable,  # evaluated against what is served: the gate's baseline check passes
            )
            wait_for(lambda: _state(registry, domain, candidate) == "canary", 30, 0.02, "the canary stage")
            r = client.post(
                f"/admin/rollout/{domain}/pause", json={"reason": "measure the split"}, headers=AUTH
            )
            assert r.status_code == 200, r.text
            paused_at = time.time()
            wait_for(
                lambda: sum(1 for t, _, _ in load.answers if t > paused_at + 0.5) >= 300,
                120,
                what="300 answers while the canary is paused",
            )
            split = [a for t, _, a in load.answers if t > paused_at + 0.5]
            # The split is a hash of the request id, so every answer's variant is known exactly...
            served = {a["request_id"]: a["adapter"] == candidate for a in split}
            wrong = [rid for rid, canary in served.items() if pick(rid, weight, "canary") != canary]
            assert wrong == [], f"{len(wrong)} answers served by the wrong variant"
            # ...and request ids are random, so the share is binomial (99.99% two-sided: a false alarm
            # once in 10,000 runs, while a split off by 0.12 or more at n=300 still fails).
            n, k = len(split), sum(a["adapter"] == candidate for a in split)
            bound = 3.891 * math.sqrt(n * weight * (1 - weight))
            print(f"canary share {k}/{n} = {k / n:.3f} (weight {weight}, 99.99% bound +-{bound / n:.3f})")
            assert abs(k - n * weight) <= bound
            assert {a["adapter"] for a in split} <= {stable, candidate}
            resumed = subprocess.run(
                [sys.executable, "-m", "ops.cli", "rollout", "resume", domain, "--reason", "split measured"],
                env={**os.environ, **settings_env(stack.settings)},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert resumed.returncode == 0, resumed.stderr
            assert "resumed" in resumed.stdout
            break_at.append(time.time())  # from now on the live labels show the canary is wrong
            wait_for(lambda: _state(registry, domain, candidate) == "rolled_back", 60, 0.02, "the rollback")
            decided = next(
                e for e in registry.audit(domain) if e.type == "rolled_back" and e.version == candidate
            )
            drained = wait_for(
                lambda: _drained(registry, domain, decided.ts), 30, 0.05, "every replica to drop the canary"
            )
            after_drain = time.time()
            wait_for(
                lambda: sum(1 for t, _, _ in load.answers if t > after_drain) >= 200,
                60,
                what="200 answers after the drain",
            )
    finally:
        producer.close()
    assert load.failures == []
    last_canary = max(t for t, _, a in load.answers if a["adapter"] == candidate)
    budget = CANARY_INTERVAL_S * CANARY_FAILURE_THRESHOLD
    rollback_s, drain_s = decided.ts - break_at[0], drained - decided.ts
    print(
        f"rollback decided {rollback_s:.2f}s after the break (interval x threshold = {budget:.1f}s), "
        f"drained {drain_s:.2f}s later; last canary answer sent {last_canary - break_at[0]:.2f}s "
        "after the break"
    )
    # The first failing interval ends at most one interval after the break; labels need one controller tick.
    assert rollback_s <= budget + CANARY_INTERVAL_S + 1.0
    assert last_canary <= drained
    late = [a for t, _, a in load.answers if t > drained and a["adapter"] != stable]
    assert late == [], f"{len(late)} answers after the drain not from the promoted version"
    assert registry.active()[domain] == stable
    trail = [e.type for e in registry.audit(domain) if e.version == candidate]
    assert {"paused", "resumed", "rolled_back"} <= set(trail)
    assert trail.count("analysis") >= CANARY_FAILURE_THRESHOLD


def _drained(registry, domain: str, since: float) -> float | None:
    replicas = registry.replicas()
    if replicas and all(r["ts"] > since and domain not in r["rollout"] for r in replicas.values()):
        return time.time()
    return None


_SLOW_PUBLISH = """
import sys, time
from pathlib import Path
from learners import artifacts
from streams.schemas import ArtifactManifest
root, domain, version, phase = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
manifest = ArtifactManifest(
    domain=domain, version=version, base_fingerprint=sys.argv[5], labels=["a", "b"], files={}
)
def write(tmp):
    (tmp / "adapter").mkdir()
    (tmp / "adapter" / "adapter_config.json").write_text("{}")
    if phase == "write":
        print("writing", flush=True)
        time.sleep(600)
staged = artifacts.stage(root, manifest, write)
print("staged", flush=True)
time.sleep(600)
artifacts.commit(staged)
"""


def _replica_actors(client, n: int) -> dict[str, str]:
    """replica id -> Ray actor name, gathered from /healthz (requests spread over the replicas). While
    replicas restart a request may wait on one that is going away: that is no answer yet, not an error."""
    found: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while len(found) < n and time.monotonic() < deadline:
        try:
            r = client.get("/healthz", timeout=5)
        except httpx.TransportError:
            continue
        if r.status_code == 200:
            found[r.json()["replica"]] = r.json()["actor"]
    return found


def test_kill_during_publish_then_restart_every_replica_serves_the_promoted_version(
    stack, registry, candidates, client
):
    import ray

    placer = Placer(stack, registry, candidates)
    domain = "crash-publish"
    promoted = placer.bootstrap(domain, candidates.good)
    wait_for(
        lambda: (
            client.post("/v1/predict", json={"text": "I was charged twice", "domain": domain}).json()[
                "adapter"
            ]
            == promoted
        ),
        30,
        what="the promoted version served",
    )
    crashed = []
    for phase in ("write", "staged"):
        version = f"v-crash-{phase}"
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _SLOW_PUBLISH,
                str(stack.settings.artifacts_dir),
                domain,
                version,
                phase,
                candidates.encoder.fingerprint,
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() in {"writing", "staged"}
        proc.send_signal(signal.SIGKILL)  # kill -9 mid-publish
        proc.wait()
        crashed.append(version)
    domain_dir = stack.settings.artifacts_dir / domain
    leftovers = [p.name for p in domain_dir.iterdir() if p.name.startswith(artifacts.TMP_PREFIX)]
    assert len(leftovers) == 2 and not any((domain_dir / v).exists() for v in crashed)
    n = stack.settings.num_replicas
    before = _replica_actors(client, n)
    assert len(before) == n
    for name in before.values():
        ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    wait_for(
        lambda: len(set(_replica_actors(client, n)) - set(before)) == n, 180, 0.5, "every replica restarted"
    )
    wait_for(lambda: client.get("/healthz").status_code == 200, 120, 0.5, "healthy after the restart")
    seen: dict[str, set] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (
        len(seen) < stack.settings.num_replicas or sum(map(len, seen.values())) < 40
    ):
        r = client.post("/v1/predict", json={"text": "My invoice shows the wrong amount", "domain": domain})
        if r.status_code == 200:
            seen.setdefault(r.headers["x-driftserve-replica"], set()).add(r.json()["adapter"])
    print(f"after kill -9 mid-publish and restarting every replica: {seen}")
    assert len(seen) == stack.settings.num_replicas
    assert all(adapters == {promoted} for adapters in seen.values())
    assert registry.active()[domain] == promoted


def test_admin_api_needs_its_token_and_reports_the_registry(stack, registry, candidates, client):
    r = client.get("/admin/registry")
    assert r.status_code == 401 and "Bearer" in r.json()["error"]
    r = client.get("/admin/registry", headers={"authorization": "Bearer wrong"})
    assert r.status_code == 401
    placer = Placer(stack, registry, candidates)
    version = placer.bootstrap("admin-api", candidates.good)
    listing = client.get("/admin/registry", params={"domain": "admin-api"}, headers=AUTH).json()
    assert listing["active"] == {"admin-api": version}
    shown = client.get(f"/admin/registry/admin-api/{version}", headers=AUTH).json()
    assert shown["record"]["state"] == "promoted" and shown["manifest"]["version"] == version
    assert [e["type"] for e in shown["audit"]] == ["promoted"]
    assert client.get("/admin/registry/admin-api/v-nope", headers=AUTH).status_code == 404
    r = client.post("/admin/rollout/admin-api/rollback", json={}, headers=AUTH)
    assert r.status_code == 409 and "no rollout" in r.json()["error"]
    assert client.post("/admin/rollout/admin-api/explode", json={}, headers=AUTH).status_code == 400
    cli = subprocess.run(
        [sys.executable, "-m", "ops.cli", "registry", "ls", "admin-api", "--json"],
        env={**os.environ, **settings_env(stack.settings)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["active"] == {"admin-api": version}
    status = client.get("/admin/rollout", headers=AUTH).json()
    assert len(status["replicas"]) == stack.settings.num_replicas
    assert np.isfinite(status["recent"][-1]["ts"])


def test_a_decision_on_a_candidate_that_moved_meanwhile_changes_nothing(stack, registry, candidates):
    """The controller reads the waiting candidates, then verifies and gates each one. If an operator
    promotes the version meanwhile, the controller's rejection must not turn the served version rejected
    (CI once caught exactly that: the registry's active version was a record in state 'rejected')."""
    from ops.wiring import rollout_controller

    placer = Placer(stack, registry, candidates)
    domain = "moved-meanwhile"
    version = placer.place(domain, candidates.good)
    registry.install(domain, version, parent=None, actor="test", reason="operator promoted it")
    # What the controller read a moment before: the same version, still waiting, with no evaluation
    # (which fails the offline gate, so the controller goes on to reject it).
    stale = registry.get(domain, version).model_copy(update={"state": "candidate", "metrics": {}})
    controller = rollout_controller(stack.settings)
    with pytest.raises(RegistryConflict, match="promoted, no longer a candidate"):
        controller._start(domain, stale)
    for decide in (
        lambda: registry.reject(domain, version, actor="test", reason="late", metrics={}),
        lambda: registry.supersede(domain, version, by="v-newer", actor="test"),
    ):
        with pytest.raises(RegistryConflict):
            decide()
    assert registry.get(domain, version).state == "promoted"
    assert registry.active()[domain] == version
    assert [e.type for e in registry.audit(domain)] == ["promoted"]
    with pytest.raises(RegistryConflict, match="already registered"):
        registry.install(domain, version, parent=None, actor="test", reason="twice")


def test_a_pause_that_lands_while_the_controller_decides_holds(stack, registry, candidates):
    """The controller reads the rollouts, then judges each one. An operator's pause landing in between
    must hold: neither the verdict nor the promotion, stage move or rollback that follows it may apply
    to the paused rollout (a stage move used to write a fresh, unpaused state over it)."""
    from ops.rollout_policy import Window
    from ops.wiring import rollout_controller

    placer = Placer(stack, registry, candidates)
    domain = "paused-meanwhile"
    stable = placer.bootstrap(domain, candidates.good)
    version = placer.place(domain, candidates.good_next, parent=stable)
    good = {"holdout_size": 10.0, "holdout_accuracy": 1.0, "current_accuracy": 1.0, "nfr": 0.0, "ece": 0.0}
    placer.submit(domain, version, {**good, "current_ece": 0.0}, parent=stable)
    wait_for(lambda: _state(registry, domain, version) in {"shadow", "canary"}, 30, 0.02, "the rollout")
    registry.set_paused(domain, True, actor="test", reason="hold it")
    held = registry.rollouts()[domain]
    # What the controller read a moment before the pause, and an interval of failing answers.
    stale = held.model_copy(update={"paused": False})
    controller = rollout_controller(stack.settings)
    controller._track({domain: stale})
    failing = Window()
    for i in range(20):
        failing.add_answer(
            {"variant": "canary", "label": None, "stable_label": "a", "rid": str(i), "error": "X"}
        )
    controller._tracking[domain].window = failing
    with pytest.raises(RegistryConflict, match="was paused"):
        controller.analyse_rollouts({domain: stale}, time.time() + 3600)
    for decide in (
        lambda: registry.rollback(domain, actor="test", reason="late verdict", version=version),
        lambda: registry.promote(domain, version, actor="test", reason="late verdict", from_rollout=True),
        lambda: registry.start(domain, version, "canary", weight=0.5, actor="test", reason="late verdict"),
    ):
        with pytest.raises(RegistryConflict, match="was paused"):
            decide()
    assert registry.rollouts()[domain] == held
    assert _state(registry, domain, version) == held.stage
    assert registry.audit(domain)[-1].type == "paused"  # nothing recorded after it
    # The operator's own decisions still apply to a paused rollout.
    registry.rollback(domain, actor="test", reason="operator ends it")
    assert domain not in registry.rollouts() and _state(registry, domain, version) == "rolled_back"


def test_a_candidate_evaluated_against_a_version_no_longer_served_is_rejected(stack, registry, candidates):
    """The offline gate compares a candidate with what its evaluation measured as current; if another
    version is served by the time the controller takes it (it waited behind that version's rollout),
    those figures say nothing and the candidate is rejected. Evaluated again, it is gated as usual."""
    placer = Placer(stack, registry, candidates)
    domain = "stale-evaluation"
    served = placer.bootstrap(domain, candidates.good)
    good = {"holdout_size": 10.0, "holdout_accuracy": 1.0, "current_accuracy": 1.0, "nfr": 0.0, "ece": 0.0}
    good["current_ece"] = 0.0
    stale = placer.place(domain, candidates.good_next)
    placer.submit(domain, stale, good)  # a first adapter, compared with the memory alone
    wait_for(
        lambda: _state(registry, domain, stale) == "rejected", 30, 0.05, "the stale candidate's rejection"
    )
    reason = registry.get(domain, stale).reason
    assert reason == f"stale evaluation: compared with the memory alone, {served} is served now", reason
    fresh = placer.place(domain, candidates.good_next)
    placer.submit(domain, fresh, good, evaluated_against=served)  # the learner evaluated it again
    wait_for(
        lambda: _state(registry, domain, fresh) == "shadow", 30, 0.05, "the re-evaluated candidate's shadow"
    )
    assert registry.active()[domain] == served
    registry.rollback(domain, actor="test", reason="done")


def test_a_rollout_never_starts_on_an_evaluation_a_promotion_made_stale(stack):
    """The controller checks a candidate's baseline, then starts its rollout; a promotion landing in
    between must make the start fail (one transaction), not slip a stale candidate into shadow. On a
    namespace of its own on the stack's Redis, so the running controller does not take the candidate."""
    from dataclasses import replace as dc_replace

    from streams.redis_store import connect
    from streams.registry_store import RegistryStore

    cfg = dc_replace(stack.settings.redis(), namespace=f"t-{uuid.uuid4().hex[:8]}")
    client = connect(cfg)
    try:
        reg = RegistryStore(client, cfg)
        reg.submit_candidate("d", "v2", parent=None, metrics={})  # compared with the memory alone
        reg.install("d", "v1", parent=None, actor="operator", reason="promoted meanwhile")
        with pytest.raises(StaleEvaluation, match="compared with the memory alone, v1 is served now"):
            reg.start("d", "v2", "shadow", shadow_share=1.0, actor="test", reason="gate passed")
        assert "d" not in reg.rollouts() and reg.get("d", "v2").state == "candidate"
        reg.submit_candidate("d", "v3", parent=None, metrics={}, evaluated_against="v1")
        reg.start("d", "v3", "shadow", shadow_share=1.0, actor="test", reason="gate passed")
        assert reg.rollouts()["d"].version == "v3"
    finally:
        for key in client.scan_iter(f"{cfg.namespace}:*"):
            client.delete(key)
        client.close()
