"""The decisions of the rollout controller as pure functions: the offline gate over a candidate's
evaluation report, and the analysis of one shadow or canary interval over online observations.

No I/O here, so every rule is unit-tested on its own; :mod:`ops.rollout` feeds them and acts.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields, replace
from typing import Any


@dataclass(frozen=True)
class GatePolicy:
    """Offline gate (per domain; defaults from settings, overrides per domain)."""

    epsilon: float = 0.02  # holdout accuracy >= current - epsilon
    max_nfr: float = 0.05  # negative flips on the holdout
    max_ece_increase: float = 0.1  # calibration: ece <= current_ece + this
    # ECE over 15 bins on a handful of examples measures nothing (one example moves it by 1/n): below this
    # holdout size the calibration check is reported as not measured instead of deciding the gate.
    ece_min_holdout: int = 30
    compat_epsilon: float = 0.02  # compat_new_old >= compat_old_old - this
    min_holdout: int = 4  # an evaluation on fewer examples is no evaluation
    adapter_margin: float = 0.2  # the head alone may trail the current system by at most this much
    # A domain's first adapter replaces the memory-only path, which keeps adapting online between
    # rollouts; an adapter that does not beat it on the holdout by this much only adds risk (a head
    # trained on a skewed early window can be confidently wrong once the mix shifts). 0: off. The gain
    # must also be significant at ``first_alpha``: an exact one-sided sign test of the holdout's positive
    # against negative flips (1: the bare margin). On reviews-finefood a first adapter trained on 111
    # examples passed the bare margin on 27 held out (1 positive flip, 0 negative: p = 0.5) and then
    # trailed retrain by 2.2 points over 2,022 answers; adapters trained on 573 and 726 examples had p
    # of 0.002 and 0.0007 and beat it by 2.9 to 5.5 points.
    first_min_gain: float = 0.02
    first_alpha: float = 0.05

    def __post_init__(self) -> None:
        shares = (
            "epsilon",
            "max_nfr",
            "max_ece_increase",
            "compat_epsilon",
            "adapter_margin",
            "first_min_gain",
        )
        for name in shares:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not 0.0 < self.first_alpha <= 1.0:
            raise ValueError(f"first_alpha must be in (0, 1] (0 would never pass), got {self.first_alpha!r}")
        for name in ("min_holdout", "ece_min_holdout"):
            value = getattr(self, name)
            if (isinstance(value, float) and not value.is_integer()) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")


@dataclass(frozen=True)
class RolloutPolicy:
    gate: GatePolicy = field(default_factory=GatePolicy)
    gate_overrides: dict[str, GatePolicy] = field(default_factory=dict)
    shadow_share: float = 1.0
    shadow_seconds: float = 30.0
    canary_weight: float = 0.2
    interval_s: float = 30.0
    passes: int = 3
    failure_threshold: int = 2
    min_requests: int = 10
    min_feedback: int = 5
    max_error_rate: float = 0.01
    max_p99_ms: float = 1000.0
    max_p99_ratio: float = 1.5
    max_nfr: float = 0.05
    epsilon: float = 0.02
    # The label checks fail an interval only on evidence: one-sided exact tests at this level (the flip
    # rate against max_nfr; the canary's negative vs positive flips, a paired sign test, for accuracy).
    # A handful of labels per interval otherwise rolls back a better candidate on one unlucky flip.
    alpha: float = 0.05

    def gate_for(self, domain: str) -> GatePolicy:
        return self.gate_overrides.get(domain, self.gate)


def parse_gate_overrides(raw: str, base: GatePolicy | None = None) -> dict[str, GatePolicy]:
    """``{"domain": {"max_nfr": 0.01, ...}}`` -> per-domain policies; a bad key or value is a ValueError."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"gate policy overrides are not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError("gate policy overrides must map domain -> {field: value}")
    known = {f.name for f in fields(GatePolicy)}
    base = base or GatePolicy()
    out = {}
    for domain, values in data.items():
        if not isinstance(values, dict) or set(values) - known:
            raise ValueError(f"gate override for {domain!r}: fields must be among {sorted(known)}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values.values()):
            raise ValueError(f"gate override for {domain!r}: values must be numbers")
        try:
            out[domain] = replace(base, **values)
        except ValueError as exc:
            raise ValueError(f"gate override for {domain!r}: {exc}") from exc
    return out


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    checks: tuple[Check, ...]

    @property
    def reason(self) -> str:
        failed = [c for c in self.checks if not c.passed]
        shown = failed or self.checks
        return "; ".join(f"{c.name}: {c.detail}" for c in shown)


def offline_gate(report: dict[str, float], policy: GatePolicy) -> GateDecision:
    """Accuracy, negative flips, calibration and compatibility of a candidate's evaluation report."""
    checks = []
    size = int(report.get("holdout_size", 0))
    checks.append(
        Check("evaluated", size >= policy.min_holdout, f"{size} held-out examples (min {policy.min_holdout})")
    )
    if size < policy.min_holdout:
        return GateDecision(False, tuple(checks))
    new, cur = report["holdout_accuracy"], report["current_accuracy"]
    checks.append(
        Check("accuracy", new >= cur - policy.epsilon, f"{new:.3f} vs current {cur:.3f} - {policy.epsilon}")
    )
    nfr = report.get("nfr", math.inf)
    checks.append(Check("nfr", nfr <= policy.max_nfr, f"{nfr:.3f} (max {policy.max_nfr})"))
    ece, cur_ece = report.get("ece", math.inf), report.get("current_ece", 0.0)
    measured = size >= policy.ece_min_holdout
    checks.append(
        Check(
            "calibration",
            ece <= cur_ece + policy.max_ece_increase or not measured,
            f"ece {ece:.3f} vs current {cur_ece:.3f} + {policy.max_ece_increase}"
            + ("" if measured else f" (not measured: {size} examples, min {policy.ece_min_holdout})"),
        )
    )
    if policy.first_min_gain > 0 and report.get("has_parent", 1.0) == 0.0:
        # Both answered the same held-out examples: only the discordant pairs say which is better.
        # H0: a discordant pair is a positive flip no more often than a negative one.
        nf, pf = round(report.get("nfr", 0.0) * size), round(report.get("pfr", 0.0) * size)
        p = binomial_sf(pf, nf + pf, 0.5)
        checks.append(
            Check(
                "first_gain",
                new >= cur + policy.first_min_gain and p <= policy.first_alpha,
                f"first adapter {new:.3f} vs memory only {cur:.3f} + {policy.first_min_gain}; {pf} positive "
                f"vs {nf} negative flips, sign test p={p:.3g} (max {policy.first_alpha:g})",
            )
        )
    if "adapter_accuracy" in report:
        alone = report["adapter_accuracy"]
        checks.append(
            Check(
                "adapter",
                alone >= cur - policy.adapter_margin,
                f"head alone {alone:.3f} vs current {cur:.3f} - {policy.adapter_margin}",
            )
        )
    if "compat_new_old" in report and "compat_old_old" in report:
        new_old, old_old = report["compat_new_old"], report["compat_old_old"]
        checks.append(
            Check(
                "compatibility",
                new_old >= old_old - policy.compat_epsilon,
                f"new-vs-old {new_old:.3f} vs old-vs-old {old_old:.3f} - {policy.compat_epsilon}",
            )
        )
    return GateDecision(all(c.passed for c in checks), tuple(checks))


@dataclass
class Window:
    """Online observations of one candidate over one interval (or a shadow stage)."""

    answers: int = 0  # requests the candidate answered (canary) or was mirrored (shadow)
    stable_answers: int = 0
    errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    stable_latencies_ms: list[float] = field(default_factory=list)  # the promoted version's, same interval
    agree: int = 0
    labelled: int = 0  # candidate answers whose feedback arrived
    candidate_correct: int = 0
    stable_correct: int = 0
    negative_flips: int = 0
    positive_flips: int = 0

    def add_answer(self, obs: dict[str, Any]) -> None:
        if obs["variant"] == "stable":
            self.stable_answers += 1
            self.stable_latencies_ms.append(float(obs.get("latency_ms", 0.0)))
            return
        self.answers += 1
        self.latencies_ms.append(float(obs.get("latency_ms", 0.0)))
        if obs.get("error"):
            self.errors += 1
        elif obs.get("label") == obs.get("stable_label"):
            self.agree += 1

    def add_label(self, obs: dict[str, Any], truth: str) -> None:
        if obs["variant"] == "stable" or obs.get("error"):
            return
        new_ok, old_ok = obs.get("label") == truth, obs.get("stable_label") == truth
        self.labelled += 1
        self.candidate_correct += new_ok
        self.stable_correct += old_ok
        self.negative_flips += old_ok and not new_ok
        self.positive_flips += new_ok and not old_ok

    def p99_ms(self) -> float:
        return _p99(self.latencies_ms)

    def stable_p99_ms(self) -> float | None:
        return _p99(self.stable_latencies_ms) if self.stable_latencies_ms else None

    def summary(self) -> dict[str, float]:
        out = {
            "answers": float(self.answers),
            "stable_answers": float(self.stable_answers),
            "errors": float(self.errors),
            "error_rate": self.errors / self.answers if self.answers else 0.0,
            "p99_ms": self.p99_ms(),
            "stable_p99_ms": self.stable_p99_ms() or 0.0,
            "agreement": self.agree / max(1, self.answers - self.errors),
            "labelled": float(self.labelled),
        }
        if self.labelled:
            out.update(
                accuracy=self.candidate_correct / self.labelled,
                stable_accuracy=self.stable_correct / self.labelled,
                nfr=self.negative_flips / self.labelled,
                pfr=self.positive_flips / self.labelled,
            )
        return out


def analyse(window: Window, policy: RolloutPolicy) -> tuple[bool | None, str, dict[str, float]]:
    """One interval's verdict: True pass, False fail, None inconclusive (too few answers)."""
    s = window.summary()
    failures = []
    if window.errors and s["error_rate"] > policy.max_error_rate:
        failures.append(f"error rate {s['error_rate']:.3f} > {policy.max_error_rate}")
    notes = []
    if window.answers and s["p99_ms"] > policy.max_p99_ms:
        # Over the bound is the candidate's fault only if the promoted version, answering in the same
        # interval on the same replicas, was clearly faster: an overloaded node (a learner training on
        # the serving cores) slows both, and rolling the candidate back would not help.
        stable = window.stable_p99_ms()
        if stable is None or s["p99_ms"] > policy.max_p99_ratio * stable:
            versus = "" if stable is None else f" and > {policy.max_p99_ratio:g} x stable {stable:.0f} ms"
            failures.append(f"p99 {s['p99_ms']:.0f} ms > {policy.max_p99_ms:.0f} ms{versus}")
        else:
            notes.append(f"p99 {s['p99_ms']:.0f} ms over the bound, as is the stable's {stable:.0f} ms")
    if window.labelled >= policy.min_feedback:
        failures += _label_failures(window, s, policy, notes)
    if failures:
        return False, "; ".join(failures), s
    if window.answers < policy.min_requests:
        return None, f"inconclusive: {window.answers} answers (min {policy.min_requests})", s
    verdict = "within bounds" if not notes else "passed; " + "; ".join(notes)
    return True, f"{window.answers} answers, {window.labelled} labelled: {verdict}", s


def _label_failures(
    window: Window, s: dict[str, float], policy: RolloutPolicy, notes: list[str]
) -> list[str]:
    """NFR and accuracy against the promoted version on the interval's labelled answers. Each fails only
    if it is over its bound *and* the excess is significant at ``policy.alpha``; one that is over but
    within noise becomes a note in the verdict's reason."""
    out: list[str] = []

    def judge(excess: str, evidence: str, p: float) -> None:
        significant = p < policy.alpha
        tail = "" if significant else f", not significant at {policy.alpha:g}"
        (out if significant else notes).append(f"{excess} ({evidence} p={p:.3g}{tail})")

    nf, pf, n = window.negative_flips, window.positive_flips, window.labelled
    if s["nfr"] > policy.max_nfr:
        # H0: the candidate's true flip rate is at most max_nfr; p = P(X >= nf), X ~ Bin(n, max_nfr).
        judge(
            f"nfr {s['nfr']:.3f} > {policy.max_nfr}",
            f"{nf} of {n} labelled,",
            binomial_sf(nf, n, policy.max_nfr),
        )
    if s["accuracy"] < s["stable_accuracy"] - policy.epsilon:
        # Both versions answered the same requests: only the discordant pairs say which is better.
        # H0: a discordant pair is a negative flip no more often than a positive one (exact sign test).
        judge(
            f"accuracy {s['accuracy']:.3f} < stable {s['stable_accuracy']:.3f} - {policy.epsilon}",
            f"{nf} negative vs {pf} positive flips, sign test",
            binomial_sf(nf, nf + pf, 0.5),
        )
    return out


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), exact (summed in log space, so large n cannot underflow)."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0 or p >= 1.0:
        return float(p >= 1.0)
    lp, lq, lnf = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    terms = [
        lnf - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k, n + 1)
    ]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def _p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
