"""The Predictor: texts (+ domain) -> calibrated label distribution, the one code path that serves and
that learners evaluate candidates with.

Per request: the base embedding (memory key) is always computed; a domain with an active adapter is
scored by its LoRA encoder + head, a domain without one by the nearest-class-mean head over the error
memory (so a label first seen in feedback is predictable at once); then ReLoop2 compensation blends in
the labels of the nearest stored feedback.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from serving import metrics
from serving.artifacts import Artifact
from serving.compensator import CompensationConfig, compensate_batch_parts
from serving.encoder import Encoder, TextEncoder
from serving.guard import guard_margin, keeps_parent
from serving.memory import InProcessMemory
from serving.mixing import encode_batch
from streams.schemas import DEFAULT_DOMAIN

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    domain: str
    label: str | None
    scores: dict[str, float]
    model_version: str
    adapter: str | None
    compensated: bool
    blend: float
    key: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(0, np.float32))
    variant: str = "stable"  # stable | canary: which version answered
    stable_label: str | None = None  # canary answers: what the promoted version said (for flip rates)
    canary_error: str | None = None  # canary answers: the candidate failed and the stable answer was served
    shadow: bool = False  # mirror this request to the domain's shadow candidate (answer discarded)
    mix: str | None = field(default=None, repr=False, compare=False)  # serving.mixing record, when mixed


@dataclass(frozen=True)
class ActiveAdapter:
    name: str  # the encoder's adapter name: "<domain>@<content hash>", so a cache never serves stale weights
    artifact: Artifact

    @property
    def guard(self) -> ActiveAdapter | None:
        """The parent a guarded artifact carries (``serving.guard``), as an adapter of its own."""
        g = self.artifact.guard
        return None if g is None else ActiveAdapter(adapter_name(g), g)

    @property
    def names(self) -> tuple[str, ...]:
        """Every encoder adapter this version needs loaded: its own and its guard's."""
        g = self.guard
        return (self.name,) if g is None else (self.name, g.name)


@dataclass(frozen=True)
class RetrievalConfig:
    """Routing of requests that name no domain (MOS-style, capped at ``candidates`` domains).

    The domain keys are the mean memory keys of each domain's feedback; the top ``candidates`` by cosine
    similarity are refined by predicting the class over the candidates' classes together and mapping it
    back to the domain that owns it. Refinement uses the request's base key and the class means (no
    extra backbone passes: O(m) instead of MOS's O(T)); the final answer uses the chosen domain's
    adapter. Below ``min_similarity`` the request stays in the default domain.
    """

    enabled: bool = True
    candidates: int = 3
    min_similarity: float = 0.1


@dataclass(frozen=True)
class AdapterCachePolicy:
    """How many LoRA adapters one replica keeps loaded (LRU), and which domains are never evicted."""

    max_loaded: int = 16
    pinned: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.max_loaded < 1:
            raise ValueError("max_loaded must be at least 1")


@dataclass(frozen=True)
class Rollout:
    """A candidate in flight for one domain: ``canary`` serves ``weight`` of its traffic, ``shadow`` only
    mirrors ``shadow_share`` of it. Which requests: a hash of the request id, so a retry lands alike."""

    stage: str  # shadow | canary
    adapter: ActiveAdapter
    weight: float = 0.0
    shadow_share: float = 0.0


def pick(request_id: str | None, share: float, salt: str) -> bool:
    if share <= 0.0:
        return False
    if share >= 1.0:
        return True
    if request_id is None:
        return random.random() < share
    digest = hashlib.blake2b(f"{salt}:{request_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64 < share


def adapter_name(artifact: Artifact) -> str:
    digest = artifact.manifest.files.get("adapter/adapter_model.safetensors", artifact.manifest.version)
    return f"{artifact.manifest.domain}@{digest[:16]}"


class Predictor:
    def __init__(
        self,
        encoder: Encoder,
        memory: InProcessMemory,
        comp: CompensationConfig,
        cache: AdapterCachePolicy | None = None,
        retrieval: RetrievalConfig | None = None,
        key_encoder: TextEncoder | None = None,
    ) -> None:
        """``key_encoder``: computes the adapter-free memory keys (e.g. ONNX Runtime); default ``encoder``."""
        self.key_encoder = key_encoder or encoder
        self.retrieval = retrieval or RetrievalConfig()
        self.encoder = encoder
        self.memory = memory
        self.comp = comp
        self.cache = cache or AdapterCachePolicy()
        self.base_version = encoder.fingerprint[:12]
        self._active: dict[str, ActiveAdapter] = {}
        self._rollouts: dict[str, Rollout] = {}
        self._loaded: OrderedDict[str, str] = OrderedDict()  # adapter name -> domain, LRU first
        self._swap_lock = threading.Lock()

    # -- adapters -------------------------------------------------------------------------------------
    def active_versions(self) -> dict[str, str]:
        return {d: a.artifact.manifest.version for d, a in self._active.items()}

    def activate(self, artifact: Artifact) -> None:
        """Hot-swap: load the new LoRA beside the old one, switch the pointer, then drop the old one.

        Requests resolve the active adapter and load or use it while holding the encoder lock, and old
        adapters are removed under that same lock, so no request can hold a name that disappears.
        """
        m = artifact.manifest
        name = adapter_name(artifact)
        new = ActiveAdapter(name, artifact)
        with self._swap_lock:
            old = self._active.get(m.domain)
            if old is not None and old.name == name and old.artifact.manifest == m and new.names == old.names:
                # Nothing changed. A new version with the same LoRA weights (e.g. only its head changed),
                # or the same version with new calibration metrics, still swaps.
                return
            self._load(new)  # outside the request path
            with self.encoder.lock:
                self._active = {**self._active, m.domain: new}
                self._mark_used(new)
                if old is not None:
                    for gone in set(old.names) - set(new.names):
                        self._drop_unused(gone)
                self._evict(keep=new.names)
        log.info("serving adapter %s version %s (parent %s)", name, m.version, m.parent)

    def deactivate(self, domain: str) -> None:
        with self._swap_lock, self.encoder.lock:
            old = self._active.get(domain)
            if old is not None:
                self._active = {d: a for d, a in self._active.items() if d != domain}
                for name in old.names:
                    self._drop_unused(name)

    def rollout_versions(self) -> dict[str, str]:
        return {d: r.adapter.artifact.manifest.version for d, r in self._rollouts.items()}

    def rollouts(self) -> dict[str, Rollout]:
        return dict(self._rollouts)

    def set_rollout(
        self, artifact: Artifact, stage: str, *, weight: float = 0.0, shadow_share: float = 0.0
    ) -> None:
        """Start or update the shadow/canary candidate of the artifact's domain (loaded before it counts)."""
        if stage not in {"shadow", "canary"}:
            raise ValueError(f"unknown rollout stage {stage!r}")
        domain, name = artifact.manifest.domain, adapter_name(artifact)
        rollout = Rollout(stage, ActiveAdapter(name, artifact), weight, shadow_share)
        with self._swap_lock:
            self._load(rollout.adapter)
            with self.encoder.lock:
                old = self._rollouts.get(domain)
                self._rollouts = {**self._rollouts, domain: rollout}
                self._mark_used(rollout.adapter)
                if old is not None:
                    for gone in set(old.adapter.names) - set(rollout.adapter.names):
                        self._drop_unused(gone)
                self._evict(keep=rollout.adapter.names)

    def clear_rollout(self, domain: str) -> None:
        """End the domain's rollout: from the next batch on, no request reaches the candidate."""
        with self._swap_lock, self.encoder.lock:
            old = self._rollouts.get(domain)
            if old is not None:
                self._rollouts = {d: r for d, r in self._rollouts.items() if d != domain}
                for name in old.adapter.names:
                    self._drop_unused(name)

    def _drop_unused(self, name: str) -> None:
        """Unload an adapter no active version or rollout uses any more. Caller holds the encoder lock."""
        in_use = {n for a in self._active.values() for n in a.names}
        in_use |= {n for r in self._rollouts.values() for n in r.adapter.names}
        if name in self._loaded and name not in in_use:
            self._unload(name)

    def set_cache_policy(self, policy: AdapterCachePolicy) -> None:
        with self.encoder.lock:
            self.cache = policy
            self._evict(keep=None)

    def loaded_adapters(self) -> list[str]:
        return list(self._loaded)

    def _unload(self, name: str) -> None:
        self.encoder.remove_adapter(name)
        del self._loaded[name]

    def _load(self, active: ActiveAdapter) -> None:
        """Add the version's adapters (its own, its guard's) the encoder does not hold yet."""
        for name, artifact in self._adapters(active):
            if name not in self._loaded:
                self.encoder.add_adapter(name, artifact.adapter_dir)

    @staticmethod
    def _adapters(active: ActiveAdapter) -> list[tuple[str, Artifact]]:
        guard = active.guard
        return [(active.name, active.artifact)] + ([] if guard is None else [(guard.name, guard.artifact)])

    def _mark_used(self, active: ActiveAdapter) -> None:
        """Record the version's adapters as loaded and most recently used. Caller holds the encoder lock."""
        for name in reversed(active.names):  # its own adapter ends most recent
            self._loaded[name] = active.artifact.manifest.domain
            self._loaded.move_to_end(name)

    def _evict(self, keep: Sequence[str] | None) -> None:
        """Least recently used first; pinned domains and ``keep`` stay. Caller holds the encoder lock."""
        for name in list(self._loaded):
            if len(self._loaded) <= self.cache.max_loaded:
                return
            if (keep is not None and name in keep) or self._loaded[name] in self.cache.pinned:
                continue
            self._unload(name)
            metrics.ADAPTER_CACHE.labels("eviction").inc()

    def _use(self, active: ActiveAdapter) -> None:
        """Make sure the version's adapters are loaded (on demand after an eviction). Caller holds the
        encoder lock."""
        for name, artifact in self._adapters(active):
            if name in self._loaded:
                self._loaded.move_to_end(name)
                metrics.ADAPTER_CACHE.labels("hit").inc()
                continue
            metrics.ADAPTER_CACHE.labels("miss").inc()
            self.encoder.add_adapter(name, artifact.adapter_dir)
            self._loaded[name] = artifact.manifest.domain
        self._evict(keep=active.names)

    # -- prediction -----------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The memory key of each text (base model, no adapter)."""
        return self.key_encoder.encode(texts)

    def route(self, key: np.ndarray) -> tuple[str, float]:
        """The domain for a request that names none, and the similarity of its key to that domain."""
        return self.route_batch(np.asarray(key, dtype=np.float32).reshape(1, -1))[0]

    def route_batch(self, keys: np.ndarray) -> list[tuple[str, float]]:
        """``route`` for every row of ``keys`` at once: one product against the domain keys and one per
        candidate domain's class means, whatever the batch size."""
        cfg = self.retrieval
        names, cents = self.memory.domain_centroids()
        if not cfg.enabled or not names:
            metrics.ROUTE_FALLBACK.inc(len(keys))
            return [(DEFAULT_DOMAIN, 0.0)] * len(keys)
        sims = keys @ cents.T  # (rows, domains)
        order = np.argsort(-sims, axis=1, kind="stable")[:, : cfg.candidates]
        rows = np.arange(len(keys))
        confident = sims[rows, order[:, 0]] >= cfg.min_similarity
        # MOS refinement: predict the class over the candidates' classes jointly and map it back to the
        # domain that owns it (its nearest class mean), instead of trusting the domain centroid alone.
        # Candidates are compared in centroid order, so a tie keeps the nearer domain.
        class_sim = np.full(order.shape, -np.inf, dtype=np.float32)
        for j in set(order[confident].ravel().tolist()):
            _, means = self.memory.class_means(names[j])
            if len(means):
                best = (keys @ means.T).max(axis=1)
                class_sim = np.where(order == j, best[:, None], class_sim)
        chosen = order[rows, np.argmax(class_sim, axis=1)]
        out: list[tuple[str, float]] = []
        for i in range(len(keys)):
            if confident[i]:
                out.append((names[chosen[i]], float(sims[i, chosen[i]])))
            else:
                out.append((DEFAULT_DOMAIN, float(sims[i, order[i, 0]])))
        routed = int(confident.sum())
        if routed:
            metrics.ROUTED.inc(routed)
        if routed < len(keys):
            metrics.ROUTE_FALLBACK.inc(len(keys) - routed)
        return out

    def predict(
        self,
        texts: Sequence[str],
        domains: Sequence[str | None],
        request_ids: Sequence[str | None] | None = None,
    ) -> list[Prediction]:
        """``domains[i]`` None: route by retrieval (the chosen domain is in the prediction).

        ``request_ids`` decide which requests a canary serves and which a shadow mirrors.
        """
        if len(texts) != len(domains):
            raise ValueError("texts and domains must have the same length")
        ids = list(request_ids) if request_ids is not None else [None] * len(texts)
        t0 = time.perf_counter()
        keys = self.embed(texts)
        metrics.STAGE["encode"].observe(time.perf_counter() - t0)
        if any(d is None for d in domains):
            t1 = time.perf_counter()
            unnamed = [i for i, d in enumerate(domains) if d is None]
            routed = iter(self.route_batch(keys[unnamed]))
            domains = [d if d is not None else next(routed)[0] for d in domains]
            metrics.STAGE["retrieval"].observe(time.perf_counter() - t1)
        metrics.BATCH_SIZE.observe(len(texts))
        results: list[Prediction | None] = [None] * len(texts)
        by_domain: dict[str, list[int]] = {}
        for i, d in enumerate(domains):
            by_domain.setdefault(d, []).append(i)
        for domain, idx in by_domain.items():
            preds = self._group(domain, [texts[i] for i in idx], keys[idx])
            assert preds is not None
            rollout = self._rollouts.get(domain)
            if rollout is not None and rollout.stage == "canary":
                preds = self._canary(
                    domain, rollout, [texts[i] for i in idx], keys[idx], [ids[i] for i in idx], preds
                )
            elif rollout is not None:
                preds = [
                    replace(p, shadow=pick(ids[i], rollout.shadow_share, "shadow"))
                    for i, p in zip(idx, preds, strict=True)
                ]
            for row, pred in zip(idx, preds, strict=True):
                results[row] = pred
        return [r for r in results if r is not None]

    def _group(
        self, domain: str, texts: list[str], keys: np.ndarray, rollout: bool = False
    ) -> list[Prediction] | None:
        """Score one domain's rows with its promoted adapter, or (``rollout``) its candidate; None when
        the candidate is gone. The adapter is resolved under the encoder lock, so a swap that unloads it
        cannot slip in between."""
        head_probs = guard_probs = None
        guard = None
        with self.encoder.lock:
            if rollout:
                current = self._rollouts.get(domain)
                if current is None:
                    return None
                active: ActiveAdapter | None = current.adapter
            else:
                active = self._active.get(domain)
            if active is not None:
                t1 = time.perf_counter()
                self._use(active)
                adapted = self.encoder.encode(texts, adapter=active.name)
                head_probs = active.artifact.head.probs(adapted)
                if guard_margin(active.artifact) is not None:
                    guard = active.guard
                    assert guard is not None
                    guard_probs = guard.artifact.head.probs(self.encoder.encode(texts, adapter=guard.name))
                metrics.STAGE["adapter"].observe(time.perf_counter() - t1)
        preds = self._finish_group(domain, keys, active, head_probs)
        if guard is None or active is None:
            return preds
        # A compatible prediction update (serving.guard): the parent's answer stands where the candidate
        # disagrees without being sure; it is served under the candidate's version, which it now is.
        margin = guard_margin(active.artifact)
        assert margin is not None
        parent = self._finish_group(domain, keys, guard, guard_probs)
        return [
            replace(o, model_version=n.model_version, adapter=n.adapter)
            if keeps_parent(n.scores, n.label, o.label, margin)
            else n
            for n, o in zip(preds, parent, strict=True)
        ]

    def _canary(
        self,
        domain: str,
        rollout: Rollout,
        texts: list[str],
        keys: np.ndarray,
        ids: list[str | None],
        stable: list[Prediction],
    ) -> list[Prediction]:
        """Serve the canary's share with the candidate; keep the stable answer beside it for flip rates.
        A failing candidate never fails the request: the stable answer is served and the error counted."""
        rows = [j for j, rid in enumerate(ids) if pick(rid, rollout.weight, "canary")]
        if not rows:
            return stable
        out = list(stable)
        try:
            cand = self._group(domain, [texts[j] for j in rows], keys[rows], rollout=True)
        except Exception as exc:  # the candidate's failure is data for the analysis
            log.warning("canary %s failed: %s", rollout.adapter.name, exc)
            for j in rows:
                out[j] = replace(stable[j], canary_error=type(exc).__name__)
            return out
        if cand is None:  # the rollout ended while this batch ran
            return stable
        for j, p in zip(rows, cand, strict=True):
            out[j] = replace(p, variant="canary", stable_label=stable[j].label)
        return out

    def shadow(self, domain: str, texts: list[str], keys: np.ndarray) -> list[Prediction] | None:
        """The shadow candidate's answers for mirrored requests (None if the rollout ended meanwhile)."""
        rollout = self._rollouts.get(domain)
        if rollout is None or rollout.stage != "shadow":
            return None
        return self._group(domain, texts, keys, rollout=True)

    def _finish_group(
        self, domain: str, keys: np.ndarray, active: ActiveAdapter | None, head_probs: np.ndarray | None
    ) -> list[Prediction]:
        """Adapter head and/or the memory's scorer, then compensation, for the rows of one domain.

        Without an adapter the memory's online experts (``serving.scorer``) score the rows; with one, the
        head's distribution is mixed with theirs at the adapter's calibrated ``memory_weight`` (fitted by
        the learner on held-out feedback, saved with the artifact's metrics).
        """
        t0 = time.perf_counter()
        served = ""  # the adapter version answering ("" for the memory alone): what calibration is kept by
        mixed = compensated = None
        scorer_on = self.memory.scorer.cfg.enabled
        k = max(self.comp.k if self.comp.enabled else 0, self.memory.scorer.cfg.knn_k if scorer_on else 0)
        sims, neighbour_labels = (
            self.memory.search_batch(domain, keys, k) if k else (np.zeros((len(keys), 0)), [[]] * len(keys))
        )
        if scorer_on:
            mem_vocab, mem_probs = self.memory.score(domain, keys, sims, neighbour_labels)
        else:
            mem_vocab, mem_probs = self._prototype_batch(domain, keys)
        if active is not None and head_probs is not None:
            vocab = list(active.artifact.head.labels)
            probs = head_probs.astype(np.float64)
            version = f"{self.base_version}/{domain}@{active.artifact.manifest.version}"
            adapter: str | None = active.artifact.manifest.version
            served = active.artifact.manifest.version
            if mem_vocab:
                # The learner's weight, then what the labelled answers of this version taught since.
                weight, _ = self.memory.mixing.weight(domain, served, memory_weight(active.artifact))
                metrics.MEMORY_MIX_WEIGHT.labels(domain).set(weight)
                mixed = (list(vocab), probs, list(mem_vocab), mem_probs)
                probs, vocab = mix_distributions(probs, vocab, mem_probs, mem_vocab, weight)
        else:
            vocab, probs = list(mem_vocab), mem_probs
            version, adapter = self.base_version, None
        lam = np.zeros(len(keys))
        comp = compensation_for(self.comp, active.artifact if active is not None else None)
        if comp.enabled:
            sims, neighbour_labels = sims[:, : comp.k], [row[: comp.k] for row in neighbour_labels]
            if sims.shape[1]:
                index = {lab: i for i, lab in enumerate(vocab)}
                seen = {lab for row in neighbour_labels for lab in row}
                for lab in sorted(seen.difference(index)):  # labels the head does not know yet (open set)
                    index[lab] = len(vocab)
                    vocab.append(lab)
                if probs.shape[1] < len(vocab):
                    probs = np.pad(probs, ((0, 0), (0, len(vocab) - probs.shape[1])))
                label_idx = np.array([[index[lab] for lab in row] for row in neighbour_labels])
                scale, _ = self.memory.mixing.comp_scale(domain, served)
                metrics.COMPENSATION_SCALE.labels(domain).set(scale)
                pre = probs
                probs, lam, raw, y_bar = compensate_batch_parts(
                    pre, sims.astype(np.float64), label_idx, comp, scale
                )
                learned = np.where(sims[:, 0] < comp.sim_high, raw, 0.0)  # near-duplicates are not scaled
                compensated = (list(vocab), pre, y_bar, learned)
        mixes = encode_batch(served, mixed, compensated) if mixed or compensated else [None] * len(keys)
        metrics.STAGE["compensation"].observe(time.perf_counter() - t0)
        out = []
        for i, (label, scores) in enumerate(ranked(vocab, probs, len(keys))):
            out.append(
                Prediction(
                    domain=domain,
                    label=label,
                    scores=scores,
                    model_version=version,
                    adapter=adapter,
                    compensated=bool(lam[i] > 0.0),
                    blend=float(lam[i]),
                    key=keys[i],
                    mix=mixes[i],
                )
            )
        return out

    def _prototype_batch(self, domain: str, keys: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Nearest class mean over the memory (the scorer switched off)."""
        vocab, means = self.memory.class_means(domain)
        if not vocab:
            return [], np.zeros((len(keys), 0))
        z = (keys @ means.T) / self.comp.prototype_tau
        z -= z.max(axis=1, keepdims=True)
        probs = np.exp(z)
        return vocab, probs / probs.sum(axis=1, keepdims=True)


def ranked(vocab: list[str], probs: np.ndarray, rows: int) -> list[tuple[str | None, dict[str, float]]]:
    """Each row's label (its most probable) and scores: rounded to 6 places, highest first, ties in
    vocabulary order, zeros left out; (None, {}) for a row with nothing probable. One sort per batch."""
    if not len(vocab):
        return [(None, {})] * rows
    top = probs.argmax(axis=1)
    answered = (probs[np.arange(rows), top] > 0).tolist()
    rounded = np.round(probs, 6)
    order = np.argsort(-rounded, axis=1, kind="stable").tolist()
    out: list[tuple[str | None, dict[str, float]]] = []
    for i, row in enumerate(rounded.tolist()):
        if answered[i]:
            out.append((vocab[top[i]], {vocab[j]: row[j] for j in order[i] if row[j] > 0}))
        else:
            out.append((None, {}))
    return out


DEFAULT_MEMORY_WEIGHT = 0.5


def memory_weight(artifact: Artifact) -> float:
    """The share of the memory's scorer next to this adapter's head, as calibrated by the learner."""
    value = artifact.manifest.metrics.get("memory_weight", DEFAULT_MEMORY_WEIGHT)
    return float(min(1.0, max(0.0, value)))


def compensation_for(comp: CompensationConfig, artifact: Artifact | None) -> CompensationConfig:
    """The compensation an adapter is served with: the deployment's, with the similarity below which
    neighbours are ignored raised to the adapter's calibrated ``compensation_sim_low`` (fitted by the
    learner on held-out feedback: where a domain's mere neighbours disagree with their labels, only
    near-duplicates should overrule the model). Never lowered, never at or past ``sim_high``."""
    if artifact is None:
        return comp
    floor = artifact.manifest.metrics.get("compensation_sim_low")
    if floor is None or not comp.sim_low < float(floor) < comp.sim_high:
        return comp
    return replace(comp, sim_low=float(floor))


def mix_distributions(
    head: np.ndarray, head_vocab: list[str], mem: np.ndarray, mem_vocab: list[str], weight: float
) -> tuple[np.ndarray, list[str]]:
    """(1 - weight) * head + weight * memory over the union of both vocabularies (head labels first)."""
    known = set(head_vocab)
    vocab = list(head_vocab) + [lab for lab in mem_vocab if lab not in known]
    index = {lab: i for i, lab in enumerate(vocab)}
    out = np.zeros((head.shape[0], len(vocab)))
    out[:, : head.shape[1]] = (1.0 - weight) * head
    cols = [index[lab] for lab in mem_vocab]
    out[:, cols] += weight * mem
    return out, vocab
