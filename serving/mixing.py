"""Online calibration of the head / memory mix, per domain and adapter version.

A domain with an adapter is answered by ``(1 - w) * head + w * memory`` (``serving.predictor``). The
learner fits ``w`` on its holdout before the rollout, but the holdout is a few hundred events from the
past, and how much the memory helps changes with the traffic: on a stream of near-duplicates (spam
campaigns) it should carry the answer, on sentiment reviews its semantic neighbours often disagree with
their labels and it should step back. So serving keeps learning ``w`` from its own answers:

    each answer records p_head(y) and p_memory(y) for every label y (``ServedMix``, kept by request id);
    when the request's label arrives, the memory writer puts (version, p_head(y*), p_memory(y*)) into the
    entry it writes, and every replica, applying the log in the same order, takes one projected online
    gradient step on the mixture's log-loss:

        w <- clip(w + lr * (p_m - p_h) / max((1 - w) p_h + w p_m, P_FLOOR), W_MIN, 1 - W_MIN)

The loss is convex in ``w``, so the steps track the best fixed mix of the recent answers (online gradient
descent), which may lie between the two, unlike a vote for the better component. It starts from the
learner's value (the adapter's ``memory_weight``) and is kept per adapter version, so a canary learns its
own and a new version starts from its own prior; only the last ``WINDOW`` outcomes count. A forgotten
entry's outcome is dropped and the weight recomputed without it: it leaves no trace.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass

import numpy as np

LEARNING_RATE = 0.02
P_FLOOR = 0.05  # the mixture's probability below which a step stops growing (bounds one step to lr / P_FLOOR)
W_MIN = 0.02  # neither side is ever switched off completely: the weight must be able to come back
WINDOW = 1000  # outcomes per version the weight is learned from (older traffic is forgotten)
TOP_LABELS = 16  # labels of each distribution kept with a request (the rest count as probability 0)


@dataclass(frozen=True)
class ServedMix:
    """What one answer mixed: the adapter version and both label distributions, before compensation.
    Serving keeps it as JSON (``encode_batch``) under the request id; the memory writer reads it back."""

    adapter: str
    head: dict[str, float]
    memory: dict[str, float]

    def to_json(self) -> str:
        def top(dist: dict[str, float]) -> tuple[list[str], list[float]]:
            best = sorted(dist.items(), key=lambda kv: -kv[1])[:TOP_LABELS]
            return [k for k, _ in best], [round(float(v), 6) for _, v in best]

        (hl, h), (ml, m) = top(self.head), top(self.memory)
        return json.dumps({"v": self.adapter, "hl": hl, "h": h, "ml": ml, "m": m})

    @classmethod
    def from_json(cls, raw: str | bytes) -> ServedMix | None:
        """None for anything that is not a mix record (a foreign or truncated value is no reason to fail)."""
        try:
            data = json.loads(raw)
            head = {str(k): float(v) for k, v in zip(data["hl"], data["h"], strict=True)}
            memory = {str(k): float(v) for k, v in zip(data["ml"], data["m"], strict=True)}
            return cls(str(data["v"]), head, memory)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def outcome(self, label: str) -> tuple[str, float, float]:
        """(adapter version, p_head(label), p_memory(label)): what the memory writer logs with the entry."""
        return self.adapter, self.head.get(label, 0.0), self.memory.get(label, 0.0)


def encode_batch(
    adapter: str, vocab: list[str], probs: np.ndarray, mem_vocab: list[str], mem_probs: np.ndarray
) -> list[str]:
    """``ServedMix.to_json`` of every row of a batch, built once per batch where it can be (a few
    microseconds per answer: this runs on the request path)."""
    if len(vocab) > TOP_LABELS or len(mem_vocab) > TOP_LABELS:
        return [
            ServedMix(
                adapter, dict(zip(vocab, h, strict=True)), dict(zip(mem_vocab, m, strict=True))
            ).to_json()
            for h, m in zip(probs.tolist(), mem_probs.tolist(), strict=True)
        ]
    labels = f'"hl": {json.dumps(vocab)}, "ml": {json.dumps(mem_vocab)}'
    prefix = f'{{"v": {json.dumps(adapter)}, {labels}, '
    heads, mems = np.round(probs, 6).tolist(), np.round(mem_probs, 6).tolist()
    return [f'{prefix}"h": {h}, "m": {m}}}' for h, m in zip(heads, mems, strict=True)]


def step(w: float, p_head: float, p_memory: float, lr: float = LEARNING_RATE) -> float:
    """One projected gradient step on -log((1 - w) * p_head + w * p_memory)."""
    mix = max((1.0 - w) * p_head + w * p_memory, P_FLOOR)
    return min(1.0 - W_MIN, max(W_MIN, w + lr * (p_memory - p_head) / mix))


class MixCalibrator:
    """The online memory weight of every (domain, adapter version) that has had labelled answers.

    It keeps the last ``window`` outcomes of each version and replays the gradient steps from the prior
    on demand (cached until the next outcome), so the weight depends only on the log and the artifact:
    every replica, and a replica that restarts and reads the log again, computes the same one, whichever
    answers it served itself."""

    def __init__(self, lr: float = LEARNING_RATE, window: int = WINDOW) -> None:
        self.lr = lr
        self.window = window
        self._outcomes: dict[tuple[str, str], deque[tuple[str, float, float]]] = {}
        self._seen: dict[tuple[str, str], int] = {}
        self._cache: dict[tuple[str, str], tuple[float, int, float]] = {}  # -> (prior, seen, weight)
        self._lock = threading.Lock()

    def observe(self, event_id: str, domain: str, adapter: str, p_head: float, p_memory: float) -> None:
        key = (domain, adapter)
        with self._lock:
            if key not in self._outcomes:
                self._outcomes[key] = deque(maxlen=self.window)
            self._outcomes[key].append((event_id, float(p_head), float(p_memory)))
            self._seen[key] = self._seen.get(key, 0) + 1

    def forget(self, event_ids: set[str]) -> None:
        """Drop the outcomes of forgotten entries (the next ``weight`` replays the steps without them)."""
        with self._lock:
            for key, outcomes in self._outcomes.items():
                kept = [o for o in outcomes if o[0] not in event_ids]
                if len(kept) < len(outcomes):
                    self._outcomes[key] = deque(kept, maxlen=self.window)
                    self._seen[key] += 1

    def weight(self, domain: str, adapter: str, prior: float) -> tuple[float, int]:
        """(weight, outcomes it learned from): ``prior`` until the version's first labelled answer."""
        key = (domain, adapter)
        with self._lock:
            outcomes = self._outcomes.get(key)
            if not outcomes:
                return prior, 0
            seen = self._seen[key]
            cached = self._cache.get(key)
            if cached is not None and cached[:2] == (prior, seen):
                return cached[2], len(outcomes)
            w = min(1.0 - W_MIN, max(W_MIN, prior))
            for _, p_head, p_memory in outcomes:
                w = step(w, p_head, p_memory, self.lr)
            self._cache[key] = (prior, seen, w)
            return w, len(outcomes)
