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

The ReLoop2 compensation after the mix (``serving.compensator``) is calibrated the same way, for every
domain (``adapter`` "" when the memory alone answers): its blend weight between ``sim_low`` and
``sim_high`` is scaled by ``s`` in [S_MIN, 1], learned from 1 by the same steps on

    -log((1 - s * lam) * p(y*) + s * lam * y_bar(y*))

where ``p`` is the distribution before compensation, ``y_bar`` the neighbours' labels and ``lam`` the
unscaled weight. Near-duplicates (top similarity at or above ``sim_high``) keep the full weight: a label
fed back corrects the next near-identical request in every domain, whatever ``s`` has learned.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

LEARNING_RATE = 0.02
P_FLOOR = 0.05  # the mixture's probability below which a step stops growing (bounds one step to lr / P_FLOOR)
W_MIN = 0.02  # neither side is ever switched off completely: the weight must be able to come back
WINDOW = 1000  # outcomes per version the weight is learned from (older traffic is forgotten)
S_MIN = 0.05  # the compensation scale's floor (the blend for mere neighbours can come back)
TOP_LABELS = 16  # labels of each distribution kept with a request (the rest count as probability 0)


@dataclass(frozen=True)
class ServedMix:
    """What one answer mixed: the adapter version ("" for memory only), the head's and the memory's
    distributions where both answered, and, where compensation blended in mere neighbours, the
    distribution before it, the neighbours' one and the unscaled blend weight. Serving keeps it as JSON
    (``encode_batch``) under the request id; the memory writer reads it back."""

    adapter: str
    head: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    pre: dict[str, float] = field(default_factory=dict)
    y_bar: dict[str, float] = field(default_factory=dict)
    lam: float = 0.0

    def to_json(self) -> str:
        def top(dist: dict[str, float]) -> list:
            best = sorted(dist.items(), key=lambda kv: -kv[1])[:TOP_LABELS]
            return [[k for k, _ in best], [round(float(v), 6) for _, v in best]]

        out: dict = {"v": self.adapter}
        if self.head:
            out |= {"h": top(self.head), "m": top(self.memory)}
        if self.lam > 0:
            out |= {"p": top(self.pre), "y": top(self.y_bar), "l": round(float(self.lam), 6)}
        return json.dumps(out)

    @classmethod
    def from_json(cls, raw: str | bytes) -> ServedMix | None:
        """None for anything that is not a mix record (a foreign or truncated value is no reason to fail)."""

        def dist(part) -> dict[str, float]:
            labels, probs = part
            return {str(k): float(v) for k, v in zip(labels, probs, strict=True)}

        try:
            data = json.loads(raw)
            mixed = {"head": dist(data["h"]), "memory": dist(data["m"])} if "h" in data else {}
            comp = (
                {"pre": dist(data["p"]), "y_bar": dist(data["y"]), "lam": float(data["l"])}
                if "l" in data
                else {}
            )
            return cls(str(data["v"]), **mixed, **comp)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None

    def outcome(self, label: str) -> Outcome:
        """What the memory writer logs with the label's entry."""
        return Outcome(
            self.adapter,
            self.head.get(label, 0.0) if self.head else None,
            self.memory.get(label, 0.0) if self.head else None,
            self.lam,
            self.pre.get(label, 0.0),
            self.y_bar.get(label, 0.0),
        )


class Outcome(NamedTuple):
    """One labelled answer, as the log carries it: the mix's side (None: no head answered) and the
    compensation's (``lam`` 0: none, or a near-duplicate's)."""

    adapter: str
    p_head: float | None
    p_memory: float | None
    lam: float = 0.0
    p_pre: float = 0.0
    p_neighbours: float = 0.0


def encode_batch(
    adapter: str,
    mix: tuple[list[str], np.ndarray, list[str], np.ndarray] | None,
    comp: tuple[list[str], np.ndarray, np.ndarray, np.ndarray] | None,
) -> list[str | None]:
    """``ServedMix.to_json`` of every row of a batch (None where a row has nothing to learn from), built
    once per batch where it can be: this runs on the request path, a few microseconds per answer.

    ``mix``: (head labels, head probs, memory labels, memory probs). ``comp``: (labels, probs before
    compensation, neighbour distributions, unscaled blend weight per row, 0 where it is not learned)."""
    n = len(mix[1]) if mix is not None else len(comp[1]) if comp is not None else 0
    wide = (mix is not None and max(len(mix[0]), len(mix[2])) > TOP_LABELS) or (
        comp is not None and len(comp[0]) > TOP_LABELS
    )
    if wide:
        rows = []
        for i in range(n):
            kw: dict = {}
            if mix is not None:
                kw |= {"head": dict(zip(mix[0], mix[1][i], strict=True))}
                kw |= {"memory": dict(zip(mix[2], mix[3][i], strict=True))}
            if comp is not None and comp[3][i] > 0:
                kw |= {"pre": dict(zip(comp[0], comp[1][i], strict=True))}
                kw |= {"y_bar": dict(zip(comp[0], comp[2][i], strict=True)), "lam": float(comp[3][i])}
            rows.append(ServedMix(adapter, **kw).to_json() if kw else None)
        return rows
    parts: list[list[str]] = [[] for _ in range(n)]
    if mix is not None:
        hl, ml = json.dumps(mix[0]), json.dumps(mix[2])
        heads, mems = np.round(mix[1], 6).tolist(), np.round(mix[3], 6).tolist()
        for i in range(n):
            parts[i].append(f'"h": [{hl}, {heads[i]}], "m": [{ml}, {mems[i]}]')
    if comp is not None:
        cl, lams = json.dumps(comp[0]), comp[3]
        for i in np.flatnonzero(lams > 0):
            pre, y_bar = np.round(comp[1][i], 6).tolist(), np.round(comp[2][i], 6).tolist()
            parts[i].append(f'"p": [{cl}, {pre}], "y": [{cl}, {y_bar}], "l": {round(float(lams[i]), 6)}')
    head = f'{{"v": {json.dumps(adapter)}, '
    return [head + ", ".join(p) + "}" if p else None for p in parts]


def step(w: float, p_head: float, p_memory: float, lr: float = LEARNING_RATE, low: float = W_MIN) -> float:
    """One projected gradient step on -log((1 - w) * p_head + w * p_memory), w kept in [low, 1 - W_MIN]."""
    mix = max((1.0 - w) * p_head + w * p_memory, P_FLOOR)
    return min(1.0 - W_MIN, max(low, w + lr * (p_memory - p_head) / mix))


def comp_step(s: float, lam: float, p_pre: float, p_neighbours: float, lr: float = LEARNING_RATE) -> float:
    """One step on the compensation scale: -log((1 - s lam) p_pre + s lam y_bar), s kept in [S_MIN, 1]."""
    blended = max((1.0 - s * lam) * p_pre + s * lam * p_neighbours, P_FLOOR)
    return min(1.0, max(S_MIN, s + lr * lam * (p_neighbours - p_pre) / blended))


class MixCalibrator:
    """The online memory weight and compensation scale of every (domain, adapter version) that has had
    labelled answers.

    It keeps the last ``window`` outcomes of each version and replays the gradient steps from the prior
    on demand (cached until the next outcome), so the values depend only on the log and the artifact:
    every replica, and a replica that restarts and reads the log again, computes the same ones, whichever
    answers it served itself."""

    def __init__(self, lr: float = LEARNING_RATE, window: int = WINDOW) -> None:
        self.lr = lr
        self.window = window
        # (kind, domain, adapter) -> outcomes; kind "mix": (event id, p_head, p_memory), "comp": (event
        # id, lam, p_pre, p_neighbours)
        self._outcomes: dict[tuple[str, str, str], deque[tuple]] = {}
        self._seen: dict[tuple[str, str, str], int] = {}
        self._cache: dict[tuple[str, str, str], tuple[float, int, float]] = {}  # -> (start, seen, value)
        self._lock = threading.Lock()

    def observe(self, event_id: str, domain: str, outcome: Outcome) -> None:
        with self._lock:
            if outcome.p_head is not None and outcome.p_memory is not None:
                self._add(("mix", domain, outcome.adapter), (event_id, outcome.p_head, outcome.p_memory))
            if outcome.lam > 0:
                row = (event_id, outcome.lam, outcome.p_pre, outcome.p_neighbours)
                self._add(("comp", domain, outcome.adapter), row)

    def _add(self, key: tuple[str, str, str], row: tuple) -> None:
        if key not in self._outcomes:
            self._outcomes[key] = deque(maxlen=self.window)
        self._outcomes[key].append(row)
        self._seen[key] = self._seen.get(key, 0) + 1

    def forget(self, event_ids: set[str]) -> None:
        """Drop the outcomes of forgotten entries (the next lookup replays the steps without them)."""
        with self._lock:
            for key, outcomes in self._outcomes.items():
                kept = [o for o in outcomes if o[0] not in event_ids]
                if len(kept) < len(outcomes):
                    self._outcomes[key] = deque(kept, maxlen=self.window)
                    self._seen[key] += 1

    def weight(self, domain: str, adapter: str, prior: float) -> tuple[float, int]:
        """(memory weight, outcomes it learned from): ``prior`` until the version's first labelled answer."""
        start = min(1.0 - W_MIN, max(W_MIN, prior))
        return self._replay(("mix", domain, adapter), prior, start, lambda w, o: step(w, o[1], o[2], self.lr))

    def comp_scale(self, domain: str, adapter: str) -> tuple[float, int]:
        """(compensation scale for mere neighbours, outcomes it learned from): 1 until the first one."""
        return self._replay(
            ("comp", domain, adapter), 1.0, 1.0, lambda s, o: comp_step(s, o[1], o[2], o[3], self.lr)
        )

    def _replay(self, key: tuple[str, str, str], prior: float, start: float, update) -> tuple[float, int]:
        with self._lock:
            outcomes = self._outcomes.get(key)
            if not outcomes:
                return prior, 0
            seen = self._seen[key]
            cached = self._cache.get(key)
            if cached is not None and cached[:2] == (start, seen):
                return cached[2], len(outcomes)
            value = start
            for o in outcomes:
                value = update(value, o)
            self._cache[key] = (start, seen, value)
            return value, len(outcomes)
