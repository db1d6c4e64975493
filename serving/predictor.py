"""The Predictor: texts (+ domain) -> calibrated label distribution, the one code path that serves and
that learners evaluate candidates with.

Per request: the base embedding (memory key) is always computed; a domain with an active adapter is
scored by its LoRA encoder + head, a domain without one by the nearest-class-mean head over the error
memory (so a label first seen in feedback is predictable at once); then ReLoop2 compensation blends in
the labels of the nearest stored feedback.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from serving.artifacts import Artifact
from serving.compensator import CompensationConfig, compensate, softmax
from serving.encoder import Encoder
from serving.memory import InProcessMemory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    label: str | None
    scores: dict[str, float]
    model_version: str
    adapter: str | None
    compensated: bool
    blend: float
    key: np.ndarray = field(repr=False, compare=False, default_factory=lambda: np.zeros(0, np.float32))


@dataclass(frozen=True)
class ActiveAdapter:
    name: str  # the encoder's adapter name: "<domain>@<version>"
    artifact: Artifact


class Predictor:
    def __init__(self, encoder: Encoder, memory: InProcessMemory, comp: CompensationConfig) -> None:
        self.encoder = encoder
        self.memory = memory
        self.comp = comp
        self.base_version = encoder.fingerprint[:12]
        self._active: dict[str, ActiveAdapter] = {}
        self._swap_lock = threading.Lock()

    # -- adapters -------------------------------------------------------------------------------------
    def active_versions(self) -> dict[str, str]:
        return {d: a.artifact.manifest.version for d, a in self._active.items()}

    def activate(self, artifact: Artifact) -> None:
        """Hot-swap: load the new LoRA beside the old one, switch the pointer, then drop the old one.

        Requests resolve the active adapter while holding the encoder lock, and the old adapter is
        removed under that same lock, so no request can hold a name that disappears under it.
        """
        m = artifact.manifest
        name = f"{m.domain}@{m.version}"
        with self._swap_lock:
            old = self._active.get(m.domain)
            if old is not None and old.name == name:
                return
            self.encoder.add_adapter(name, artifact.adapter_dir)
            with self.encoder.lock:
                self._active = {**self._active, m.domain: ActiveAdapter(name, artifact)}
                if old is not None:
                    self.encoder.remove_adapter(old.name)
        log.info("serving adapter %s (parent %s)", name, m.parent)

    def deactivate(self, domain: str) -> None:
        with self._swap_lock, self.encoder.lock:
            old = self._active.get(domain)
            if old is not None:
                self._active = {d: a for d, a in self._active.items() if d != domain}
                self.encoder.remove_adapter(old.name)

    # -- prediction -----------------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The memory key of each text (base model, no adapter)."""
        return self.encoder.encode(texts)

    def predict(self, texts: Sequence[str], domains: Sequence[str]) -> list[Prediction]:
        if len(texts) != len(domains):
            raise ValueError("texts and domains must have the same length")
        keys = self.embed(texts)
        results: list[Prediction | None] = [None] * len(texts)
        by_domain: dict[str, list[int]] = {}
        for i, d in enumerate(domains):
            by_domain.setdefault(d, []).append(i)
        for domain, idx in by_domain.items():
            with self.encoder.lock:
                active = self._active.get(domain)
                head_probs = None
                if active is not None:
                    adapted = self.encoder.encode([texts[i] for i in idx], adapter=active.name)
                    head_probs = active.artifact.head.probs(adapted)
            for row, i in enumerate(idx):
                if active is not None and head_probs is not None:
                    probs = dict(zip(active.artifact.head.labels, head_probs[row].tolist(), strict=True))
                    version = f"{self.base_version}/{domain}@{active.artifact.manifest.version}"
                    adapter = active.artifact.manifest.version
                else:
                    probs = self._prototype_probs(domain, keys[i])
                    version = self.base_version
                    adapter = None
                results[i] = self._finish(domain, keys[i], probs, version, adapter)
        return [r for r in results if r is not None]

    def _prototype_probs(self, domain: str, key: np.ndarray) -> dict[str, float]:
        labels, means = self.memory.class_means(domain)
        if not labels:
            return {}
        p = softmax(means @ key, self.comp.prototype_tau)
        return dict(zip(labels, p.tolist(), strict=True))

    def _finish(
        self, domain: str, key: np.ndarray, probs: dict[str, float], version: str, adapter: str | None
    ) -> Prediction:
        blend = 0.0
        if self.comp.enabled:
            sims, labels = self.memory.search(domain, key, self.comp.k)
            probs, blend = compensate(probs, sims, labels, self.comp)
        label = max(probs, key=lambda k: probs[k]) if probs else None
        return Prediction(
            label=label,
            scores={k: round(v, 6) for k, v in sorted(probs.items(), key=lambda kv: -kv[1])},
            model_version=version,
            adapter=adapter,
            compensated=blend > 0.0,
            blend=blend,
            key=key,
        )
