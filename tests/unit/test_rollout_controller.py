"""The controller's start of a rollout after the offline gate, on a recording stand-in for the registry
(the real registry's transitions are integration-tested against Redis)."""

from __future__ import annotations

import pytest

from ops.rollout import RolloutController
from ops.rollout_policy import GatePolicy, RolloutPolicy
from streams.registry_store import StaleEvaluation, VersionRecord

PASSING = {"holdout_size": 50.0, "holdout_accuracy": 0.9, "current_accuracy": 0.8, "nfr": 0.0, "ece": 0.05}


class _Registry:
    def __init__(self, stale: bool = False) -> None:
        self.stale = stale
        self.calls: list[tuple[str, tuple, dict]] = []

    def start(self, *args, **kwargs):
        self.calls.append(("start", args, kwargs))
        if self.stale:
            raise StaleEvaluation("compared with the memory alone, v1 is served now")

    def reject(self, *args, **kwargs):
        self.calls.append(("reject", args, kwargs))


def _controller(registry: _Registry, **policy) -> RolloutController:
    controller = object.__new__(RolloutController)  # no Redis or Kafka: only _start's decisions
    controller.policy = RolloutPolicy(gate=GatePolicy(first_min_gain=0), **policy)
    controller.registry = registry
    controller._verify = lambda record: None
    return controller


def _record() -> VersionRecord:
    return VersionRecord(domain="d", version="v2", state="candidate", parent="v1", metrics=PASSING)


@pytest.mark.parametrize(
    ("policy", "stage", "share", "weight"),
    [
        ({"shadow_seconds": 30.0, "shadow_share": 0.5, "canary_weight": 0.2}, "shadow", 0.5, 0.0),
        ({"shadow_seconds": 0.0, "shadow_share": 0.5, "canary_weight": 0.2}, "canary", 0.0, 0.2),
    ],
)
def test_a_passing_candidate_starts_in_shadow_or_straight_in_canary(policy, stage, share, weight):
    registry = _Registry()
    _controller(registry, **policy)._start("d", _record())
    ((name, args, kwargs),) = registry.calls
    assert name == "start" and args == ("d", "v2", stage)
    assert kwargs["shadow_share"] == share and kwargs["weight"] == weight
    assert kwargs["reason"].startswith("offline gate passed")


def test_a_stale_evaluation_is_rejected_with_its_reason():
    registry = _Registry(stale=True)
    _controller(registry)._start("d", _record())
    assert [c[0] for c in registry.calls] == ["start", "reject"]
    assert (
        registry.calls[1][2]["reason"] == "stale evaluation: compared with the memory alone, v1 is served now"
    )
