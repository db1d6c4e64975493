"""Compatible prediction updates: a new version keeps its parent's answer unless it is sure.

Backward-compatible prediction updates (Träuble et al., 2021) observe that most negative flips of an
update are samples where the new model disagrees with the old one without much confidence: the flips
there are close to coin tosses between fixing and breaking an answer, so they cost compatibility and buy
almost no accuracy. A guarded artifact therefore serves, per request, the candidate's answer where both
agree or where the candidate's probability of its label exceeds its probability of the parent's label by
more than ``guard_margin`` (fitted by the learner on held-out feedback); elsewhere the parent's answer.

Both answers are the full served distributions (head mixed with the memory's scorer, then compensation),
so the guard compares exactly what each version would have served. The parent travels inside the artifact
(``serving.artifacts.GUARD_DIR``) and is the parent's own adapter and head, never its guard, so a guarded
version costs one extra adapter forward per request of its domain, not a chain of them.
"""

from __future__ import annotations

from collections.abc import Mapping

from serving.artifacts import Artifact

GUARD_MARGIN = "guard_margin"  # manifest metric: the margin the candidate must win by to change an answer


def guard_margin(artifact: Artifact) -> float | None:
    """The artifact's fitted margin, or None when it is not guarded (serve the candidate as is)."""
    if artifact.guard is None:
        return None
    value = artifact.manifest.metrics.get(GUARD_MARGIN)
    return None if value is None else float(value)


def keeps_parent(
    new_scores: Mapping[str, float], new_label: str | None, old_label: str | None, margin: float
) -> bool:
    """Whether the parent's answer stands: the candidate disagrees but not by more than ``margin``."""
    if old_label is None or new_label == old_label:
        return False
    if new_label is None:
        return True
    return new_scores.get(new_label, 0.0) - new_scores.get(old_label, 0.0) <= margin
