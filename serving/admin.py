"""Operator actions on the registry, shared by the admin HTTP endpoints and the ``driftserve`` CLI.

Every action goes through :class:`~streams.registry_store.RegistryStore` (one transaction plus its audit
record); a manual promotion verifies the artifact with serving's loader first, so an operator cannot
point replicas at something they would refuse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serving.artifacts import MANIFEST, load_artifact
from serving.errors import ArtifactRejected, Conflict, NotFound
from streams.registry_store import RegistryConflict, RegistryStore

# States an operator may promote from: candidates in any stage, and earlier versions to revert to.
OPERATOR_PROMOTABLE = frozenset({"candidate", "shadow", "canary", "retired", "rolled_back", "superseded"})


class RegistryAdmin:
    def __init__(self, store: RegistryStore, artifacts_dir: Path, base_fingerprint: str, dim: int) -> None:
        self.store = store
        self.artifacts_dir = Path(artifacts_dir)
        self.base_fingerprint = base_fingerprint
        self.dim = dim

    # -- reads --------------------------------------------------------------------------------------------
    def listing(self, domain: str | None = None) -> dict[str, Any]:
        active, rollouts = self.store.serving_view()
        return {
            "active": active if domain is None else {d: v for d, v in active.items() if d == domain},
            "rollouts": {d: r.model_dump() for d, r in rollouts.items() if domain in (None, d)},
            "versions": [r.model_dump() for r in self.store.versions(domain)],
        }

    def show(self, domain: str, version: str) -> dict[str, Any]:
        record = self.store.get(domain, version)
        if record is None:
            raise NotFound(f"{domain}/{version} is not registered")
        manifest_path = self.artifacts_dir / domain / version / MANIFEST
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
        return {
            "record": record.model_dump(),
            "manifest": manifest,
            "lineage": [r.version for r in self.store.lineage(domain, version)],
            "audit": [e.model_dump() for e in self.store.audit(domain, limit=500) if e.version == version],
        }

    def status(self, domain: str | None = None) -> dict[str, Any]:
        active, rollouts = self.store.serving_view()
        return {
            "active": active,
            "rollouts": {d: r.model_dump() for d, r in rollouts.items() if domain in (None, d)},
            "replicas": self.store.replicas(),
            "recent": [e.model_dump() for e in self.store.audit(domain, limit=20)],
        }

    # -- actions ------------------------------------------------------------------------------------------
    def promote(self, domain: str, version: str | None, *, actor: str, reason: str) -> dict[str, Any]:
        """Promote the in-flight candidate (``version`` None) or a named version, after verifying it."""
        if version is None:
            rollout = self.store.rollouts().get(domain)
            if rollout is None:
                raise Conflict(f"{domain} has no rollout in flight; name a version to promote")
            version = rollout.version
        record = self.store.get(domain, version)
        if record is None:
            raise NotFound(f"{domain}/{version} is not registered")
        if record.state not in OPERATOR_PROMOTABLE:
            raise Conflict(f"{domain}/{version} is {record.state}; it cannot be promoted")
        try:
            load_artifact(
                self.artifacts_dir / domain / version, base_fingerprint=self.base_fingerprint, dim=self.dim
            )
        except ArtifactRejected as exc:
            raise Conflict(f"{domain}/{version} fails verification: {exc.message}") from exc
        return self._do(
            lambda: self.store.promote(domain, version, actor=actor, reason=reason, allow=OPERATOR_PROMOTABLE)
        )

    def rollback(self, domain: str, *, actor: str, reason: str) -> dict[str, Any]:
        return self._do(lambda: self.store.rollback(domain, actor=actor, reason=reason))

    def pause(self, domain: str, paused: bool, *, actor: str, reason: str) -> dict[str, Any]:
        return self._do(lambda: self.store.set_paused(domain, paused, actor=actor, reason=reason))

    @staticmethod
    def _do(action) -> dict[str, Any]:
        try:
            return action().model_dump()
        except RegistryConflict as exc:
            raise Conflict(str(exc)) from exc
