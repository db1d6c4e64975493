"""Drift detection on the prequential error of the feedback stream, one monitor per domain.

The learner does not see what serving answered, so it measures the error of its own cheap proxy: an
online softmax regression over hashed word and bigram counts, which predicts each feedback event before
learning it (test-then-train). Page-Hinkley (Page 1954; Gama et al. 2013) watches that error: it alarms
when the cumulative deviation of the error above its running mean exceeds ``threshold``. A label seen
for the first time is an error of the proxy too, so a new class also raises the alarm.
"""

from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass, field

import numpy as np

_TOKEN = re.compile(r"\w+", re.UNICODE)


@dataclass
class PageHinkley:
    """Alarm on an increase of the mean of a stream of values (here 0/1 errors)."""

    delta: float = 0.005  # tolerated change of the mean
    threshold: float = 15.0  # lambda: alarm when the cumulative deviation exceeds it
    min_samples: int = 30
    n: int = 0
    mean: float = 0.0
    cum: float = 0.0
    cum_min: float = 0.0

    def update(self, x: float) -> bool:
        self.n += 1
        self.mean += (x - self.mean) / self.n
        self.cum += x - self.mean - self.delta
        self.cum_min = min(self.cum_min, self.cum)
        return self.n >= self.min_samples and self.cum - self.cum_min > self.threshold

    def reset(self) -> None:
        self.n, self.mean, self.cum, self.cum_min = 0, 0.0, 0.0, 0.0


@dataclass
class HashedProxy:
    """Online multinomial logistic regression on hashed unigrams and bigrams (no encoder needed)."""

    buckets: int = 2**15
    lr: float = 0.2
    labels: list[str] = field(default_factory=list)
    weight: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.weight = np.zeros((0, self.buckets), dtype=np.float32)

    def features(self, text: str) -> np.ndarray:
        words = _TOKEN.findall(text.lower())
        grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
        idx = np.fromiter((zlib.crc32(g.encode()) % self.buckets for g in grams), dtype=np.int64)
        return np.unique(idx)

    def predict(self, feats: np.ndarray) -> str | None:
        if not self.labels:
            return None
        return self.labels[int(np.argmax(self.weight[:, feats].sum(axis=1)))]

    def learn(self, feats: np.ndarray, label: str) -> None:
        if label not in self.labels:
            self.labels.append(label)
            self.weight = np.vstack([self.weight, np.zeros((1, self.buckets), dtype=np.float32)])
        z = self.weight[:, feats].sum(axis=1) / max(1.0, np.sqrt(len(feats)))
        p = np.exp(z - z.max())
        p /= p.sum()
        p[self.labels.index(label)] -= 1.0
        self.weight[:, feats] -= (self.lr * p / max(1.0, np.sqrt(len(feats))))[:, None].astype(np.float32)


@dataclass
class DriftMonitor:
    """Per-domain proxy + Page-Hinkley; ``observe`` returns True when drift is detected (then resets)."""

    detector: PageHinkley = field(default_factory=PageHinkley)
    proxy: HashedProxy = field(default_factory=HashedProxy)
    errors: int = 0
    seen: int = 0
    alarms: int = 0

    def observe(self, text: str, label: str) -> bool:
        feats = self.proxy.features(text)
        wrong = self.proxy.predict(feats) != label
        self.proxy.learn(feats, label)
        self.seen += 1
        self.errors += int(wrong)
        if self.detector.update(float(wrong)):
            self.detector.reset()
            self.alarms += 1
            return True
        return False
