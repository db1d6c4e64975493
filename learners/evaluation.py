"""Candidate evaluation with serving's own Predictor (error-memory compensation included).

The report compares the candidate with what the domain serves now (its promoted adapter, or the
memory-only predictor when there is none) on held-out recent feedback:

- ``holdout_accuracy`` / ``current_accuracy``;
- ``nfr`` / ``pfr``: negative and positive flip rates, NF(x) = [old(x) = y] and [new(x) != y] (MUSCLE);
- ``ece`` / ``current_ece``: expected calibration error of the top label (15 equal-width bins);
- ``compat_new_old`` / ``compat_old_old``: the empirical compatibility criterion (BCT): top-1 retrieval
  accuracy of held-out queries embedded by the candidate against a gallery of training examples embedded
  by the current adapter, next to the current adapter against itself. Only with a current adapter.

The error memory holds only the training window, so held-out answers are never looked up.

Before those predictions, the candidate's ``memory_weight`` (its head's share next to the memory's
scorer at serving time, ``serving.predictor.memory_weight``) is fitted on the held-out feedback: the
weight on a grid that maximises held-out accuracy (ties: log-likelihood). It travels in the manifest's
metrics, so serving mixes exactly as evaluated.

A guarded candidate (``serving.guard``: it keeps its parent's answer unless it is sure of its own) gets its
``guard_margin`` fitted the same way, after the weight and the floor: the margin on a grid that maximises
held-out PFR - ``GUARD_NFR_COST`` * NFR against the parent, both served by the Predictor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from learners.buffer import Example
from learners.trainer import TrainingInterrupted
from serving.artifacts import Artifact
from serving.compensator import CompensationConfig, compensate_batch
from serving.encoder import Encoder
from serving.guard import GUARD_MARGIN, keeps_parent
from serving.memory import InProcessMemory
from serving.predictor import Prediction, Predictor, adapter_name, memory_weight, mix_distributions
from streams.redis_store import MemoryEntry

ECE_BINS = 15
COMPAT_GALLERY = 512
WEIGHT_GRID = np.linspace(0.0, 1.0, 11)
FLOOR_GRID = (0.7, 0.8, 0.9)  # compensation floors tried above the deployment's sim_low
GUARD_GRID = (0.0, 0.1, 0.2, 0.3, 0.4)  # guard margins tried (0: only a tie keeps the parent's answer)
GUARD_NFR_COST = 2.0  # a negative flip costs this many positive flips (as learners.interpolation)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    if len(confidence) == 0:
        return 0.0
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(float(confidence[mask].mean()) - float(correct[mask].mean()))
    return float(ece)


def flip_rates(old_correct: np.ndarray, new_correct: np.ndarray) -> tuple[float, float]:
    """(NFR, PFR) over the same examples."""
    if len(old_correct) == 0:
        return 0.0, 0.0
    return float(np.mean(old_correct & ~new_correct)), float(np.mean(~old_correct & new_correct))


class MemoEncoder:
    """An encoder that computes each (adapter, text) embedding once and then remembers it.

    One evaluation reads the same held-out texts through the same versions several times (the memory
    weight, the floor, both versions' predictions, the compatibility check); on a CPU shared with
    serving those passes took as long as the training run itself. Adapter names carry the hash of the
    LoRA weights (``adapter_name``), so a remembered embedding cannot belong to other weights. Everything
    else is the wrapped encoder's. For one evaluation: it never forgets.
    """

    CHUNK = 64  # texts embedded between two looks at ``should_stop``

    def __init__(self, encoder: Encoder, should_stop: Callable[[], bool] | None = None) -> None:
        self._encoder = encoder
        self._should_stop = should_stop
        self._seen: dict[tuple[str | None, str], np.ndarray] = {}
        self.computed = 0  # texts the wrapped encoder embedded

    def __getattr__(self, name: str):
        return getattr(self._encoder, name)

    def encode(self, texts: Sequence[str], adapter: str | None = None) -> np.ndarray:
        missing = list(dict.fromkeys(t for t in texts if (adapter, t) not in self._seen))
        for start in range(0, len(missing), self.CHUNK):
            if self._should_stop is not None and self._should_stop():
                raise TrainingInterrupted("stopped during evaluation")
            part = missing[start : start + self.CHUNK]
            rows = self._encoder.encode(part, adapter=adapter)
            self._seen.update(((adapter, t), row) for t, row in zip(part, rows, strict=True))
            self.computed += len(part)
        if not len(texts):
            return np.zeros((0, self._encoder.dim), dtype=np.float32)
        return np.stack([self._seen[(adapter, t)] for t in texts])


def _outcome(preds: Sequence[Prediction], truth: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    correct = np.array([p.label == t for p, t in zip(preds, truth, strict=True)], dtype=bool)
    confidence = np.array([p.scores.get(p.label, 0.0) if p.label else 0.0 for p in preds])
    return correct, confidence


def _adapted(predictor: Predictor, artifact: Artifact, texts: Sequence[str]) -> np.ndarray:
    predictor.activate(artifact)
    with predictor.encoder.lock:
        return predictor.encoder.encode(list(texts), adapter=adapter_name(artifact))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _top1(queries: np.ndarray, gallery: np.ndarray, gallery_labels: list[str], truth: list[str]) -> float:
    nearest = np.argmax(_unit(queries) @ _unit(gallery).T, axis=1)
    return float(np.mean([gallery_labels[j] == t for j, t in zip(nearest, truth, strict=True)]))


def _scores(
    predictor: Predictor, artifact: Artifact, domain: str, texts: Sequence[str]
) -> tuple[np.ndarray, list[str], np.ndarray]:
    """(head probabilities, memory vocabulary, memory scorer probabilities) for held-out texts."""
    adapted = _adapted(predictor, artifact, texts)
    head = artifact.head.probs(adapted).astype(np.float64)
    keys = predictor.embed(texts)
    sims, labels = predictor.memory.search_batch(domain, keys, predictor.memory.scorer.cfg.knn_k)
    mem_vocab, mem = predictor.memory.score(domain, keys, sims, labels)
    predictor.deactivate(domain)
    return head, list(mem_vocab), mem


def _best_weight(
    head: np.ndarray, head_vocab: list[str], mem: np.ndarray, mem_vocab: list[str], truth: Sequence[str]
) -> float:
    """The grid weight of the memory's scorer next to the head that fits these labels best."""
    if not mem_vocab or not len(truth):
        return 0.0
    best, best_key = 0.0, (-1.0, -np.inf)
    for w in WEIGHT_GRID:
        probs, vocab = mix_distributions(head, head_vocab, mem, mem_vocab, float(w))
        col = {lab: i for i, lab in enumerate(vocab)}
        p_true = np.array([probs[i, col[t]] if t in col else 0.0 for i, t in enumerate(truth)])
        acc = float(np.mean([vocab[j] == t for j, t in zip(probs.argmax(1), truth, strict=True)]))
        key = (round(acc, 9), float(np.log(np.clip(p_true, 1e-9, 1.0)).mean()))
        if key > best_key:
            best, best_key = float(w), key
    return best


def _best_floor(
    predictor: Predictor,
    domain: str,
    texts: Sequence[str],
    probs: np.ndarray,
    vocab: list[str],
    truth: Sequence[str],
) -> float | None:
    """The compensation floor (``sim_low``) on a grid that fits these labels best with the model's mixed
    distribution ``probs``; ties go to the lowest (the deployment's own). None: compensation is off."""
    comp = predictor.comp
    if not comp.enabled or not len(truth):
        return None
    keys = predictor.embed(texts)
    sims, labels = predictor.memory.search_batch(domain, keys, comp.k)
    if not sims.shape[1]:
        return None
    vocab = list(vocab)
    index = {lab: i for i, lab in enumerate(vocab)}
    for row in labels:
        for lab in row:
            if lab not in index:
                index[lab] = len(vocab)
                vocab.append(lab)
    probs = np.pad(probs, ((0, 0), (0, len(vocab) - probs.shape[1])))
    label_idx = np.array([[index[lab] for lab in row] for row in labels])
    grid = sorted({comp.sim_low, *(f for f in FLOOR_GRID if comp.sim_low < f < comp.sim_high)})
    best, best_acc = comp.sim_low, -1.0
    for floor in grid:
        out, _ = compensate_batch(probs, sims.astype(np.float64), label_idx, replace(comp, sim_low=floor))
        acc = float(np.mean([vocab[j] == t for j, t in zip(out.argmax(1), truth, strict=True)]))
        if acc > best_acc + 1e-12:
            best, best_acc = floor, acc
    return float(best)


def fit_compensation_floor(
    predictor: Predictor, artifact: Artifact, domain: str, texts: Sequence[str], truth: Sequence[str]
) -> float | None:
    """The compensation floor for ``artifact`` (at its memory weight) that fits held-out labels best."""
    head, mem_vocab, mem = _scores(predictor, artifact, domain, texts)
    probs, vocab = mix_distributions(
        head, list(artifact.head.labels), mem, mem_vocab, memory_weight(artifact)
    )
    return _best_floor(predictor, domain, texts, probs, vocab, truth)


def with_metrics(artifact: Artifact, **values: float) -> Artifact:
    metrics = {**artifact.manifest.metrics, **values}
    return dataclasses.replace(artifact, manifest=artifact.manifest.model_copy(update={"metrics": metrics}))


def fit_memory_weight(
    predictor: Predictor, artifact: Artifact, domain: str, texts: Sequence[str], truth: Sequence[str]
) -> float:
    """The grid weight of the memory's scorer next to ``artifact``'s head that fits held-out labels best."""
    head, mem_vocab, mem = _scores(predictor, artifact, domain, texts)
    return _best_weight(head, list(artifact.head.labels), mem, mem_vocab, truth)


def with_memory_weight(artifact: Artifact, weight: float) -> Artifact:
    return with_metrics(artifact, memory_weight=weight)


def choose_guard_margin(
    new: Sequence[Prediction],
    old_labels: Sequence[str | None],
    truth: Sequence[str],
    grid: Sequence[float] = GUARD_GRID,
) -> tuple[float, dict[float, dict[str, float]]]:
    """The margin of ``grid`` whose guarded answers score best (PFR - GUARD_NFR_COST * NFR against the
    old answers; ties to the smaller margin, which keeps more of the update), with every point's
    accuracy, NFR and PFR."""
    truth = list(truth)
    old_right = np.array([o == t for o, t in zip(old_labels, truth, strict=True)], dtype=bool)
    best, best_key = (min(grid) if grid else 0.0), -np.inf
    table: dict[float, dict[str, float]] = {}
    for margin in sorted(grid):
        labels = [
            o if keeps_parent(p.scores, p.label, o, margin) else p.label
            for p, o in zip(new, old_labels, strict=True)
        ]
        right = np.array([lab == t for lab, t in zip(labels, truth, strict=True)], dtype=bool)
        nfr, pfr = flip_rates(old_right, right)
        table[margin] = {"accuracy": float(right.mean()) if len(right) else 0.0, "nfr": nfr, "pfr": pfr}
        key = pfr - GUARD_NFR_COST * nfr
        if key > best_key + 1e-12:
            best, best_key = float(margin), key
    return best, table


def fit_guard_margin(
    predictor: Predictor,
    candidate: Artifact,
    domain: str,
    texts: Sequence[str],
    truth: Sequence[str],
    grid: Sequence[float] = GUARD_GRID,
) -> float | None:
    """The guard margin for a guarded ``candidate`` (at its memory weight and floor) on held-out labels,
    both versions served by ``predictor``; None for an artifact without a guard."""
    if candidate.guard is None or not len(truth):
        return None
    domains = [domain] * len(texts)
    predictor.activate(candidate.guard)
    old = [p.label for p in predictor.predict(texts, domains)]
    predictor.activate(dataclasses.replace(candidate, guard=None))
    new = predictor.predict(texts, domains)
    predictor.deactivate(domain)
    return choose_guard_margin(new, old, truth, grid)[0]


def memory_of(encoder: Encoder, domain: str, examples: Sequence[Example]) -> InProcessMemory:
    """An in-process error memory of ``examples``, keyed by ``encoder``'s base (as the writer keys them)."""
    memory = InProcessMemory(encoder.dim)
    if examples:
        keys = encoder.encode([e.text for e in examples])
        version = encoder.fingerprint[:12]
        memory.add(
            [MemoryEntry(e.event_id, domain, e.label, keys[i], e.ts, version) for i, e in enumerate(examples)]
        )
    return memory


def evaluate_candidate(
    encoder: Encoder,
    comp: CompensationConfig,
    domain: str,
    candidate: Artifact,
    parent: Artifact | None,
    train: Sequence[Example],
    hold: Sequence[Example],
    memory_entries: Sequence[MemoryEntry],
    guard_margin: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, float]:
    """The report the offline gate reads; empty without held-out examples. A guarded candidate is served
    at ``guard_margin``, or at the margin fitted on the holdout when it is None. ``should_stop`` is asked
    between embedding passes (``MemoEncoder``)."""
    if not hold:
        return {}
    memory = InProcessMemory(encoder.dim)
    memory.add(list(memory_entries))
    predictor = Predictor(MemoEncoder(encoder, should_stop), memory, comp)
    texts, truth = [e.text for e in hold], [e.label for e in hold]
    head, mem_vocab, mem = _scores(predictor, candidate, domain, texts)
    head_vocab = list(candidate.head.labels)
    # Cross-fitted: each half of the holdout is scored with the weight fitted on the other half, so the
    # report is not flattered by a weight chosen on the very labels it is judged on. The artifact ships
    # the weight fitted on all of it.
    halves = [np.arange(len(hold))[i::2] for i in (0, 1)]
    weight = _best_weight(head, head_vocab, mem, mem_vocab, truth)
    # The compensation floor is fitted once on the whole holdout (at the shipped weight) and used in the
    # cross-fitted halves below as well: one number from a 4-point grid, a small optimism at most.
    mixed, mixed_vocab = mix_distributions(head, head_vocab, mem, mem_vocab, weight)
    floor = _best_floor(predictor, domain, texts, mixed, mixed_vocab, truth)
    if floor is not None:
        candidate = with_metrics(candidate, compensation_sim_low=floor)
    margin = None
    if candidate.guard is not None:
        margin = guard_margin
        if margin is None:
            margin = fit_guard_margin(predictor, with_memory_weight(candidate, weight), domain, texts, truth)
    if margin is not None:
        candidate = with_metrics(candidate, **{GUARD_MARGIN: margin})
    if parent is not None:
        predictor.activate(parent)
    old_correct, old_conf = _outcome(predictor.predict(texts, [domain] * len(texts)), truth)
    new_correct = np.zeros(len(hold), dtype=bool)
    new_conf = np.zeros(len(hold))
    for this, other in (halves, halves[::-1]):
        if not len(this):
            continue
        w = _best_weight(head[other], head_vocab, mem[other], mem_vocab, [truth[i] for i in other])
        predictor.activate(with_memory_weight(candidate, w if len(other) else weight))
        part = [texts[i] for i in this]
        c, conf = _outcome(predictor.predict(part, [domain] * len(part)), [truth[i] for i in this])
        new_correct[this], new_conf[this] = c, conf
    # The head alone: a candidate the memory would have to overrule is not a candidate.
    head_correct = np.array([head_vocab[j] == t for j, t in zip(head.argmax(1), truth, strict=True)])
    candidate = with_memory_weight(candidate, weight)
    nfr, pfr = flip_rates(old_correct, new_correct)
    report = {
        "holdout_accuracy": float(new_correct.mean()),
        "current_accuracy": float(old_correct.mean()),
        "holdout_size": float(len(hold)),
        "has_parent": float(parent is not None),
        "nfr": nfr,
        "pfr": pfr,
        "ece": expected_calibration_error(new_conf, new_correct),
        "current_ece": expected_calibration_error(old_conf, old_correct),
        "memory_weight": weight,
        **({"compensation_sim_low": floor} if floor is not None else {}),
        **({GUARD_MARGIN: margin} if margin is not None else {}),
        "adapter_accuracy": float(head_correct.mean()),
        "adapter_nfr": flip_rates(old_correct, head_correct)[0],
    }
    if parent is not None and train:
        gallery_ex = list(train)[-COMPAT_GALLERY:]
        gallery = _adapted(predictor, parent, [e.text for e in gallery_ex])
        labels = [e.label for e in gallery_ex]
        report["compat_old_old"] = _top1(_adapted(predictor, parent, texts), gallery, labels, truth)
        report["compat_new_old"] = _top1(_adapted(predictor, candidate, texts), gallery, labels, truth)
    predictor.deactivate(domain)
    return report
