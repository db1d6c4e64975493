"""The replica's background sync: tails the error-memory log into the in-process index and follows the
registry pointers, hot-swapping adapters. Request threads never wait on Redis: if it is down, the
replica serves from what it already has, counts the failures, and catches up when Redis returns.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from serving import metrics
from serving.artifacts import load_artifact
from serving.errors import ArtifactRejected
from serving.memory import make_memory
from serving.predictor import Predictor
from streams.errors import StoreUnavailable
from streams.redis_store import MemoryLog, RedisConfig, connect
from streams.registry_store import RegistryStore

log = logging.getLogger(__name__)


class ReplicaSync:
    def __init__(
        self,
        predictor: Predictor,
        redis_cfg: RedisConfig,
        artifacts_dir: Path,
        interval_s: float,
        memory_kind: str = "exact",
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
        self._last_id = "0"
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
        active = self.predictor.active_versions()
        pointers = self.registry.active()
        for domain in set(active) - set(pointers):
            self.predictor.deactivate(domain)  # withdrawn (e.g. after a forget left too little data)
        for domain, version in pointers.items():
            if active.get(domain) == version or (domain, version) in self._rejected:
                continue
            self._activate(domain, version)

    def _activate(self, domain: str, version: str) -> None:
        enc = self.predictor.encoder
        try:
            artifact = load_artifact(
                self.artifacts_dir / domain / version, base_fingerprint=enc.fingerprint, dim=enc.dim
            )
            self.predictor.activate(artifact)
        except ArtifactRejected as exc:
            self._rejected.add((domain, version))
            metrics.ADAPTER_SWAPS.labels("rejected").inc()
            log.error("refusing artifact %s/%s: %s", domain, version, exc)
            return
        metrics.ADAPTER_SWAPS.labels("loaded").inc()
        metrics.ADAPTER_SERVED.labels(domain).set(artifact.manifest.created_at)

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
