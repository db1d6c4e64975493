"""Per-domain scoring from stored feedback alone: a few online experts mixed by how well each predicted
the feedback before it saw it.

Experts over the memory keys (base-model embeddings) of one domain:

- ``knn``: the top-k stored neighbours, weights softmax(s_i / tau) (ReLoop2's estimate);
- ``ncm``: nearest class mean, softmax over cosine / tau;
- ``olr@lr``: online softmax regressions, one SGD step per stored entry, at a few learning rates (a small
  rate averages over a stable stream, a large one tracks drift).

Mixture: exponentially weighted (Hedge) on each expert's log-loss, measured prequentially: when an entry
arrives, every expert first predicts its label from the state *before* the entry, then learns it. A fixed
share of the weight is spread back over all experts after each update, so the mixture can switch expert
after drift. Every replica sees the same log in the same order, so every replica computes the same weights.

Measured on the three shared streams with the cached base embeddings (prequential, every earlier label
known; see ``ops/bench/scoring.py``): the mixture beats the best single expert and a plain kNN on each.

Forgetting: ``rebuild`` retrains the regressions from the remaining entries in their order and resets the
mixture to uniform, so a forgotten entry leaves no trace in the weights.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

EPS = 1e-6


@dataclass(frozen=True)
class ScorerConfig:
    enabled: bool = True
    knn_k: int = 20
    knn_tau: float = 0.05
    ncm_tau: float = 0.05
    learning_rates: tuple[float, ...] = (0.03, 0.1, 0.5)
    logit_scale: float = 10.0
    eta: float = 0.5
    share: float = 0.01
    calibrate_per_batch: int = 256  # entries per domain and written batch that calibrate the mixture
    max_classes: int = 256  # past this many labels in a domain the regressions stop (kNN and NCM remain)

    def __post_init__(self) -> None:
        if self.knn_k < 1:
            raise ValueError("knn_k must be at least 1")
        if self.knn_tau <= 0 or self.ncm_tau <= 0:
            raise ValueError("temperatures must be positive")
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ValueError("learning_rates must be positive and at least one")
        if not 0.0 <= self.share < 1.0:
            raise ValueError("share must be in [0, 1)")

    @property
    def experts(self) -> list[str]:
        return ["knn", "ncm", *(f"olr@{lr:g}" for lr in self.learning_rates)]


@dataclass
class _DomainState:
    dim: int
    n_heads: int
    n_experts: int
    labels: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    weight: np.ndarray = field(init=False)  # (heads, classes, dim)
    bias: np.ndarray = field(init=False)  # (heads, classes)
    log_w: np.ndarray = field(init=False)  # (experts,)
    seen: int = 0
    calibrated: int = 0
    version: int = 0  # bumped by every change of the regressions or the mixture (invalidates ``cached``)
    cached: tuple | None = field(default=None, repr=False)  # see ``FeedbackScorer._linear``

    def __post_init__(self) -> None:
        self.weight = np.zeros((self.n_heads, 0, self.dim))
        self.bias = np.zeros((self.n_heads, 0))
        self.log_w = np.zeros(self.n_experts)

    regressions: bool = True  # off for good once the domain has more than ``max_classes`` labels

    def grow(self, label: str, max_classes: int) -> int | None:
        """The label's column; None once the domain has too many labels for the regressions."""
        if label not in self.index:
            self.index[label] = len(self.labels)
            self.labels.append(label)
            if self.regressions and len(self.labels) > max_classes:
                self.regressions = False
                self.weight = np.zeros((self.n_heads, 0, self.dim))
                self.bias = np.zeros((self.n_heads, 0))
                self.log_w[2:] = -np.inf
            elif self.regressions:
                self.weight = np.concatenate([self.weight, np.zeros((self.n_heads, 1, self.dim))], axis=1)
                self.bias = np.concatenate([self.bias, np.zeros((self.n_heads, 1))], axis=1)
        return self.index[label] if self.regressions else None


def _softmax_rows(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class FeedbackScorer:
    """Thread-safe: the memory's sync thread calls ``observe``/``rebuild``, request threads ``predict``."""

    def __init__(self, dim: int, cfg: ScorerConfig | None = None) -> None:
        self.dim = dim
        self.cfg = cfg or ScorerConfig()
        self._domains: dict[str, _DomainState] = {}
        self._lock = threading.Lock()
        self._n_experts = len(self.cfg.experts)

    def _state(self, domain: str) -> _DomainState:
        st = self._domains.get(domain)
        if st is None:
            st = self._domains[domain] = _DomainState(
                self.dim, len(self.cfg.learning_rates), len(self.cfg.experts)
            )
        return st

    # -- prediction ---------------------------------------------------------------------------------------
    def _experts(
        self,
        st: _DomainState,
        keys: np.ndarray,
        sims: np.ndarray,
        neighbour_labels: list[list[str]],
        class_labels: list[str],
        class_means: np.ndarray,
        cached: bool = True,
    ) -> np.ndarray:
        """(experts, n, classes) distributions over ``st.labels``; caller holds the lock. ``cached``: see
        ``_linear_logits``."""
        n, c = keys.shape[0], len(st.labels)
        out = np.zeros((self._n_experts, n, c))
        k = min(self.cfg.knn_k, sims.shape[1]) if sims.ndim == 2 else 0
        if k:
            s = sims[:, :k].astype(np.float64)
            top = s[:, :1]
            w = np.exp((s - np.where(np.isfinite(top), top, 0.0)) / self.cfg.knn_tau)  # -inf pads: weight 0
            w /= np.maximum(w.sum(axis=1, keepdims=True), 1e-12)
            get = st.index.get
            cols = np.array([[get(lab, -1) for lab in row[:k]] for row in neighbour_labels], dtype=np.int64)
            cells = (np.arange(n)[:, None] * c + cols)[cols >= 0]  # a label the scorer has not learnt: none
            out[0] = np.bincount(cells, weights=w[cols >= 0], minlength=n * c).reshape(n, c)
        z, first = self._linear_logits(st, keys, class_labels, class_means, cached)
        if z is not None:
            out[first : first + z.shape[1]] = _softmax_rows(z).transpose(1, 0, 2)
        return out

    def _linear_logits(
        self,
        st: _DomainState,
        keys: np.ndarray,
        class_labels: list[str],
        class_means: np.ndarray,
        cached: bool,
    ) -> tuple[np.ndarray | None, int]:
        """(n, experts, classes) logits of NCM (when any of ``st.labels`` has a class mean; a label without
        one gets -inf) and of the regressions, and the first expert they give; None when there are none.

        ``cached`` (requests): one product with the matrix ``_linear`` keeps between writes. Otherwise (a
        write's calibration step, after which the regressions and the class means change anyway): the
        products straight from the class means and the regression weights, building no matrix."""
        n, c = keys.shape[0], len(st.labels)
        if cached:
            weight, bias, first = self._linear(st, class_labels, class_means)
            return ((keys @ weight.T).reshape(n, -1, c) + bias if len(weight) else None), first
        parts, first = [], 2
        cols, rows = self._ncm_columns(st, class_labels)
        if cols:
            z = np.full((n, 1, c), -np.inf)
            z[:, 0, cols] = (keys @ class_means[rows].T) / self.cfg.ncm_tau
            parts.append(z)
            first = 1
        if c and st.regressions:
            z = self.cfg.logit_scale * (keys @ st.weight.reshape(-1, self.dim).T)
            parts.append(z.reshape(n, -1, c) + st.bias)
        return (np.concatenate(parts, axis=1) if parts else None), first

    @staticmethod
    def _ncm_columns(st: _DomainState, class_labels: list[str]) -> tuple[list[int], list[int]]:
        """(columns in ``st.labels``, rows of the class means) of the labels that have both."""
        known = [(st.index[lab], j) for j, lab in enumerate(class_labels) if lab in st.index]
        return ([c for c, _ in known], [j for _, j in known]) if known else ([], [])

    def _linear(
        self, st: _DomainState, class_labels: list[str], class_means: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """The linear experts' logits as one (experts x classes, dim) matrix and (experts, classes) bias:
        NCM's class means over its temperature and the regressions' weights, scaled. Returns them and
        the first expert they give.

        Cached per domain until the regressions change or the memory's class means do (``class_means``
        is the memory's cached array, replaced on every change of the domain), so a request pays one
        matrix product for all of them; caller holds the lock."""
        hit = st.cached
        if hit is not None and hit[0] == st.version and hit[1] is class_means:
            return hit[2]
        c, blocks, biases = len(st.labels), [], []
        cols, rows = self._ncm_columns(st, class_labels)
        first = 2
        if cols:
            w = np.zeros((c, self.dim))
            w[cols] = class_means[rows] / self.cfg.ncm_tau
            b = np.full(c, -np.inf)
            b[cols] = 0.0
            blocks.append(w)
            biases.append(b)
            first = 1
        if c and st.regressions:
            blocks.append(self.cfg.logit_scale * st.weight.reshape(-1, self.dim))
            biases.extend(st.bias)
        weight = np.concatenate(blocks) if blocks else np.zeros((0, self.dim))
        bias = np.stack(biases) if biases else np.zeros((0, c))
        st.cached = (st.version, class_means, (weight, bias, first))
        return weight, bias, first

    def mixture_weights(self, domain: str) -> dict[str, float]:
        with self._lock:
            st = self._domains.get(domain)
            log_w = st.log_w if st is not None else np.zeros(len(self.cfg.experts))
        w = np.exp(log_w - log_w.max())
        return dict(zip(self.cfg.experts, (w / w.sum()).tolist(), strict=True))

    def predict(
        self,
        domain: str,
        keys: np.ndarray,
        sims: np.ndarray,
        neighbour_labels: list[list[str]],
        class_labels: list[str],
        class_means: np.ndarray,
    ) -> tuple[list[str], np.ndarray]:
        """The mixture's (vocabulary, (n, V) probabilities); an empty vocabulary for an unknown domain."""
        with self._lock:
            st = self._domains.get(domain)
            if st is None or not st.labels:
                return [], np.zeros((len(keys), 0))
            experts = self._experts(st, keys, sims, neighbour_labels, class_labels, class_means)
            w = np.exp(st.log_w - st.log_w.max())
            labels = list(st.labels)
        w /= w.sum()
        flat = experts.reshape(len(w), -1)
        probs = (w @ flat).reshape(experts.shape[1:])
        if not np.isfinite(probs).all():  # a non-finite key: its experts count as having no opinion
            probs = (w @ np.nan_to_num(flat)).reshape(experts.shape[1:])
        return labels, probs

    # -- learning -----------------------------------------------------------------------------------------
    def knows(self, domain: str) -> bool:
        """Whether ``domain`` has labels already (only then can an entry calibrate the mixture)."""
        with self._lock:
            st = self._domains.get(domain)
            return st is not None and bool(st.labels)

    def observe(
        self,
        domain: str,
        key: np.ndarray,
        label: str,
        neighbours: tuple[np.ndarray, list[str], list[str], np.ndarray] | None = None,
    ) -> None:
        """Test, then train on one labelled entry. ``neighbours``: (sims, labels) of the key's top
        neighbours and the class means, all from before the entry; None skips the calibration."""
        if not self.cfg.enabled:
            return
        key = np.asarray(key, dtype=np.float64)
        with self._lock:
            st = self._state(domain)
            if neighbours is not None and label in st.index:
                sims, labels, class_labels, class_means = neighbours
                sims = np.asarray(sims)[None, : len(labels)]
                p = self._experts(
                    st, key[None, :], sims, [list(labels)], class_labels, class_means, cached=False
                )
                loss = -np.log(np.clip(p[:, 0, st.index[label]], EPS, 1.0))
                live = np.isfinite(st.log_w)
                st.log_w[live] -= self.cfg.eta * loss[live]
                w = np.exp(st.log_w - st.log_w[live].max())
                w = np.where(live, (1.0 - self.cfg.share) * w / w.sum() + self.cfg.share / live.sum(), 0.0)
                with np.errstate(divide="ignore"):
                    st.log_w = np.log(w)
                st.calibrated += 1
                st.version += 1
            self._learn(st, key, label)

    def _learn(self, st: _DomainState, key: np.ndarray, label: str) -> None:
        target = st.grow(label, self.cfg.max_classes)
        if target is not None:
            self._sgd(st, key, target)
        st.seen += 1
        st.version += 1

    def _sgd(self, st: _DomainState, key: np.ndarray, target: int) -> None:
        scale = self.cfg.logit_scale
        z = scale * (st.weight @ key) + st.bias  # (heads, classes)
        grad = _softmax_rows(z)
        grad[:, target] -= 1.0
        rates = np.asarray(self.cfg.learning_rates)[:, None] * 0.1
        st.weight -= (rates * scale * grad)[:, :, None] * key[None, None, :]
        st.bias -= rates * grad

    def rebuild(self, domain: str, keys: np.ndarray, labels: list[str]) -> None:
        """Forget everything about ``domain`` and relearn the regressions from these entries, in order."""
        with self._lock:
            st = self._domains[domain] = _DomainState(
                self.dim, len(self.cfg.learning_rates), len(self.cfg.experts)
            )
            for key, label in zip(keys.astype(np.float64), labels, strict=True):
                self._learn(st, key, label)
