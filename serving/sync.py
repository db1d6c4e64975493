"""The replica's background sync: tails the error-memory log into the in-process index and follows the
registry (promoted versions and in-flight shadow/canary candidates), hot-swapping adapters, and reports
what it serves in a heartbeat. Request threads never wait on Redis: if it is down, the
replica serves from what it already has, counts the failures, and catches up when Redis returns.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from pathlib import Path

from serving import metrics
from serving.artifacts import Artifact, load_artifact
from serving.errors import ArtifactRejected
from serving.memory import make_memory
from serving.predictor import Predictor
from streams.errors import StoreUnavailable
from streams.redis_store import MemoryLog, RedisConfig, connect
from streams.registry_store import RegistryStore, RolloutState

log = logging.getLogger(__name__)

HEARTBEAT_S = 1.0


class ReplicaSync:
    def __init__(
        self,
        predictor: Predictor,
        redis_cfg: RedisConfig,
        artifacts_dir: Path,
        interval_s: float,
        memory_kind: str = "ann",
        replica_id: str = "",
    ) -> None:
        self.predictor = predictor
        self.artifacts_dir = Path(artifacts_dir)
        self.interval_s = interval_s
        self.memory_kind = memory_kind
        client = connect(redis_cfg)
        self.client = client
        self._redis_cfg = redis_cfg
        self.log = MemoryLog(client, redis_cfg, predictor.encoder.fingerprint, generation=-1)
        self.registry = RegistryStore(client, redis_cfg)
        self.replica_id = replica_id
        self._last_id = "0"
        self._last_beat = 0.0
        self._rejected: set[tuple[str, str]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="driftserve-sync", daemon=True)
        self.healthy = False
        self.last_ok = 0.0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.replica_id:
            with contextlib.suppress(StoreUnavailable):
                self.registry.forget_replica(self.replica_id)

    def _switch_generation(self, generation: int) -> None:
        """A rebuild finished: load the new generation completely, then swap it in at once."""
        log_ = self.log.at(generation)
        fresh = make_memory(self.memory_kind, self.predictor.encoder.dim, device=self.predictor.memory.device)
        last = "0"
        while batch := log_.read_since(last):
            last = batch[-1][0]
            fresh.apply([op for _, op in batch])
        self.predictor.memory = fresh
        self.log, self._last_id = log_, last
        log.info("error memory switched to generation %d (%d entries)", generation, len(fresh))

    def step(self, block_ms: int | None = None) -> None:
        """One round: memory generation, new memory operations, registry pointers. Raises StoreUnavailable."""
        generation = self.log.current_generation()
        if generation != self.log.generation:
            self._switch_generation(generation)
        while True:
            batch = self.log.read_since(self._last_id, block_ms=block_ms)
            if not batch:
                break
            self._last_id = batch[-1][0]
            self.predictor.memory.apply([op for _, op in batch])
            block_ms = None  # only the first read may block
        metrics.MEMORY_ENTRIES.set(len(self.predictor.memory))
        pointers, rollouts = self.registry.serving_view()
        active = self.predictor.active_versions()
        for domain in set(active) - set(pointers):
            self.predictor.deactivate(domain)  # withdrawn (e.g. after a forget left too little data)
        for domain, version in pointers.items():
            if active.get(domain) == version or (domain, version) in self._rejected:
                continue
            artifact = self._load(domain, version)
            if artifact is not None:
                self.predictor.activate(artifact)
                metrics.ADAPTER_SWAPS.labels("loaded").inc()
                metrics.ADAPTER_SERVED.labels(domain).set(artifact.manifest.created_at)
        self._follow_rollouts(rollouts)
        now = time.monotonic()
        if self.replica_id and now - self._last_beat >= HEARTBEAT_S:
            self.registry.heartbeat(
                self.replica_id, self.predictor.active_versions(), self.predictor.rollout_versions()
            )
            self._last_beat = now

    def _follow_rollouts(self, rollouts: dict[str, RolloutState]) -> None:
        """Rollbacks and promotions first end what is no longer in flight, then candidates start."""
        current = self.predictor.rollouts()
        for domain in set(current) - set(rollouts):
            self.predictor.clear_rollout(domain)
        for domain, state in rollouts.items():
            have = current.get(domain)
            if (
                have is not None
                and have.adapter.artifact.manifest.version == state.version
                and (have.stage, have.weight, have.shadow_share)
                == (state.stage, state.weight, state.shadow_share)
            ):
                continue
            if (domain, state.version) in self._rejected:
                if have is not None:
                    self.predictor.clear_rollout(domain)
                continue
            artifact = (
                have.adapter.artifact
                if have is not None and have.adapter.artifact.manifest.version == state.version
                else self._load(domain, state.version)
            )
            if artifact is not None:
                self.predictor.set_rollout(
                    artifact, state.stage, weight=state.weight, shadow_share=state.shadow_share
                )
            elif have is not None:
                self.predictor.clear_rollout(domain)

    def _load(self, domain: str, version: str) -> Artifact | None:
        enc = self.predictor.encoder
        try:
            return load_artifact(
                self.artifacts_dir / domain / version, base_fingerprint=enc.fingerprint, dim=enc.dim
            )
        except ArtifactRejected as exc:
            self._rejected.add((domain, version))
            metrics.ADAPTER_SWAPS.labels("rejected").inc()
            log.error("refusing artifact %s/%s: %s", domain, version, exc)
            return None

    def _run(self) -> None:
        backoff = self.interval_s
        block_ms = max(1, int(self.interval_s * 1000))
        while not self._stop.is_set():
            try:
                self.step(block_ms=block_ms)
                self.healthy = True
                self.last_ok = time.monotonic()
                backoff = self.interval_s
            except StoreUnavailable as exc:
                if self.healthy:
                    log.warning("error memory sync failing, serving from the local copy: %s", exc)
                self.healthy = False
                metrics.MEMORY_SYNC_ERRORS.inc()
                self._stop.wait(backoff)
                backoff = min(5.0, backoff * 2)
            except Exception:  # a bug must not silently end syncing
                log.exception("sync round failed")
                self.healthy = False
                self._stop.wait(1.0)
