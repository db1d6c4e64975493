"""Extra requests that measure behaviour the prequential numbers cannot show. None of them is ever
counted in accuracy or latency, and none of them reveals a label.

* Feedback-to-fix: after a wrong prediction's label is fed back, how long until a near-duplicate of that
  text is answered correctly (the error memory's promise: a correction within a second).
* Rollout flips: when a domain's ``model_version`` changes, re-predict a fixed probe set under the new
  version and compare with the answers recorded under the old one (negative/positive flip rates).
  The probe set is always drawn from *upcoming* events, whose labels have not been revealed yet: a
  probe set of already fed-back events would be answered from the error memory (similarity 1.0) and
  show no flips whatever the new model does.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ops.replay.metrics import accuracy, flip_rates
from ops.replay.transport import Answer, PredictClient, TransportError

# Deletions stay inside the first words, so the change lands inside the encoder's token window.
_EDIT_WINDOW_WORDS = 60


def near_duplicate(text: str, rng: random.Random) -> str:
    """The same text with one interior word deleted (or, for very short texts, punctuation appended):
    close enough that the error memory should recognise it, different enough not to be a lookup."""
    words = text.split()
    if len(words) >= 5:
        i = rng.randrange(1, min(len(words), _EDIT_WINDOW_WORDS) - 1)
        candidate = " ".join(words[:i] + words[i + 1 :])
        if candidate != text:
            return candidate
    return text.rstrip() + " !"


@dataclass
class FixSample:
    """One followed error: how long after its feedback a near-duplicate came back right."""

    index: int
    event_id: str
    label: str
    predicted: str | None
    probe_text: str
    pre_label: str | None
    fixed: bool = False
    seconds: float | None = None
    probes: int = 0
    final_label: str | None = None
    compensated: bool = False
    similarity: float | None = None  # cosine(original, near-duplicate), filled in when embeddings exist


class FixSampler:
    """Follows at most ``samples`` errors, the first eligible one in each of equal slots of the replay,
    so the samples spread over the whole stream instead of bunching at the start."""

    def __init__(self, n_eval: int, samples: int) -> None:
        self.samples = max(0, samples)
        self.slot = math.ceil(n_eval / self.samples) if self.samples else 0
        self._taken: set[int] = set()

    def wants(self, position: int) -> bool:
        return self.samples > 0 and position // self.slot not in self._taken

    def take(self, position: int) -> None:
        self._taken.add(position // self.slot)


def measure_fix(
    client: PredictClient,
    sample: FixSample,
    domain: str | None,
    *,
    timeout_s: float,
    max_probes: int,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
    sent_at: float,
) -> FixSample:
    """Probe the near-duplicate with growing pauses until it is answered with the label (or give up)."""
    pause = 0.05
    while sample.probes < max_probes and clock() - sent_at < timeout_s:
        try:
            answer = client.predict(sample.probe_text, domain)
        except TransportError:
            answer = None
        sample.probes += 1
        if answer is not None:
            sample.final_label = answer.label
            sample.compensated = answer.compensated
            if answer.label == sample.label:
                sample.fixed = True
                sample.seconds = clock() - sent_at
                break
        sleep(pause)
        pause = min(0.5, pause * 1.5)
    return sample


@dataclass
class Rollout:
    """A new model version seen for a domain during the replay, with flips on its probe set."""

    domain: str
    old_version: str
    new_version: str
    position: int  # eval position of the first answer from the new version
    event_id: str
    at_s: float  # seconds since the replay loop started
    probe_age_events: int = 0  # how many of the domain's events ago the old answers were recorded
    other_version: int = 0  # probe answers from yet another version (replicas mid-swap): not compared
    flips: dict[str, float | int | None] = field(default_factory=dict)  # metrics.flip_rates
    old_accuracy: float | None = None
    new_accuracy: float | None = None


@dataclass
class _DomainState:
    positions: list[int]
    cursor: int = 0
    version: str | None = None
    seen: set[str] = field(default_factory=set)
    next_refresh: int = 0
    formed_at: int = 0
    probe: list[int] = field(default_factory=list)


@dataclass
class FlipLog:
    """Aligned truths and old/new answers of the same events, for metrics.flip_rates."""

    truth: list[str] = field(default_factory=list)
    old: list[str | None] = field(default_factory=list)
    new: list[str | None] = field(default_factory=list)

    def add(self, truth: str, old: str | None, new: str | None) -> None:
        self.truth.append(truth)
        self.old.append(old)
        self.new.append(new)

    def rates(self) -> dict[str, float | int | None]:
        return flip_rates(self.truth, self.old, self.new)


class RolloutTracker:
    """Detects version changes per domain and measures their flips on upcoming events.

    Every ``every`` events of a domain, the next probe set is the ``size`` events that lie ``every``
    events ahead; their answers under the current version are recorded. A rollout re-predicts them.
    When the replay reaches them, their real answers under an unchanged version are compared too:
    that background churn (feedback arriving in between) is the yardstick for a rollout's flips.
    """

    def __init__(
        self,
        keys: list[str],
        truths: list[str],
        probe: Callable[[int], Answer | None],
        *,
        size: int = 32,
        every: int = 500,
    ) -> None:
        self.truths = truths
        self.probe = probe
        self.size = max(0, size)
        self.every = max(1, every)
        self._state: dict[str, _DomainState] = {}
        for pos, key in enumerate(keys):
            self._state.setdefault(key, _DomainState(positions=[])).positions.append(pos)
        self._recorded: dict[int, tuple[str, str | None]] = {}  # position -> (version, answer)
        self.rollouts: list[Rollout] = []
        self.background = FlipLog()
        self.reverts = 0

    def observe(self, position: int, key: str, answer: Answer, event_id: str, at_s: float) -> None:
        """Call after each real prediction, in replay order."""
        st = self._state[key]
        cursor = st.cursor
        st.cursor += 1
        recorded = self._recorded.pop(position, None)
        if recorded is not None and recorded[0] == answer.model_version:
            self.background.add(self.truths[position], recorded[1], answer.label)
        version = answer.model_version
        if st.version is None:
            st.version = version
            st.seen.add(version)
        elif version != st.version:
            if version in st.seen:
                self.reverts += 1  # a replica still on an older version, or a rollback
            else:
                self._measure(st, key, position, version, event_id, at_s, cursor)
                st.seen.add(version)
            st.version = version
        if cursor >= st.next_refresh and self.size:
            self._refresh(st, cursor)

    def _refresh(self, st: _DomainState, cursor: int) -> None:
        # Refresh right before the replay reaches the current probes, so a probe is never an event that
        # has already been predicted for real (and fed back).
        start = cursor + self.every
        st.probe = st.positions[start : start + self.size]
        st.formed_at = cursor
        st.next_refresh = start - 1
        for pos in st.probe:
            answer = self.probe(pos)
            if answer is not None:
                self._recorded[pos] = (answer.model_version, answer.label)

    def _measure(
        self, st: _DomainState, key: str, position: int, version: str, event_id: str, at_s: float, cursor: int
    ) -> None:
        assert st.version is not None
        rollout = Rollout(key, st.version, version, position, event_id, at_s)
        rollout.probe_age_events = cursor - st.formed_at
        compared = FlipLog()
        for pos in st.probe:
            before = self._recorded.get(pos)
            if pos <= position or before is None or before[0] != st.version:
                continue
            answer = self.probe(pos)
            if answer is None:
                continue
            self._recorded[pos] = (answer.model_version, answer.label)
            if answer.model_version != version:
                rollout.other_version += 1
                continue
            compared.add(self.truths[pos], before[1], answer.label)
        rollout.flips = compared.rates()
        if compared.truth:
            rollout.old_accuracy = accuracy(compared.truth, compared.old)
            rollout.new_accuracy = accuracy(compared.truth, compared.new)
        self.rollouts.append(rollout)


def probe_answer(client: PredictClient, text: str, domain: str | None) -> tuple[Answer | None, str | None]:
    """A probe prediction that never raises: (answer, None) or (None, error kind)."""
    try:
        return client.predict(text, domain), None
    except TransportError as exc:
        return None, exc.kind
