"""``driftserve migrate-base``: prepare everything a new base model needs, while the old one keeps serving.

1. The error memory is re-keyed: ``Rebuilder`` with the new base's key encoder writes a complete
   generation under the *new* fingerprint's keys from the Kafka log (forgets honoured) and flips that
   fingerprint's generation pointer. Replicas on the old base read the old fingerprint's memory and never
   see it; a replica started on the new base finds a complete memory at once. No window without memory.
2. Every domain's promoted adapter is transferred (``learners.transfer``, Trans-LoRA) from the replay
   buffer's examples and perturbations of them, and published atomically with the new base fingerprint
   and parent = the promoted version. Its memory weight and compensation floor are fitted for the new
   base on the buffer's held-out examples (a memory of the buffer's training part, new-base keys), as the
   learner fits a candidate: no raw data beyond the buffer.
3. A plan ``<state_dir>/migrations/<new fingerprint[:12]>.json`` lists the new versions and the memory
   generation. The cutover (replicas on the new ``model_path``, registry pointers to the listed versions)
   is the rollout controller's; until then the live memory writer feeds only the old base's memory, so a
   memory writer for the new base (printed by the command) runs beside it from the rebuild on.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from learners.buffer import ReplayBuffers
from learners.transfer import TransferConfig, publish_transfer, transfer_adapter
from ops import wiring
from ops.memory_admin import Rebuilder, RebuildReport
from ops.settings import Settings
from serving.artifacts import load_artifact
from serving.encoder import model_fingerprint
from serving.models import model_path
from streams.redis_store import connect
from streams.registry_store import RegistryStore

log = logging.getLogger(__name__)


@dataclass
class MigrationReport:
    from_fingerprint: str
    to_fingerprint: str
    to_model_path: str
    memory: RebuildReport | None
    adapters: dict[str, dict] = field(default_factory=dict)  # domain -> version, parent, metrics
    skipped: dict[str, str] = field(default_factory=dict)  # domain -> why
    plan: str = ""
    seconds: float = 0.0


def migration_settings(settings: Settings, to_model: str) -> Settings:
    """The same settings on the new base; its memory writer gets its own consumer group."""
    path = model_path(to_model, cache_dir=settings.state_dir.resolve() / "models")
    fp = model_fingerprint(path)
    return settings.model_copy(
        update={"model_path": path, "consumer_group_prefix": f"{settings.consumer_group_prefix}-{fp[:12]}"}
    )


def migrate_base(
    settings: Settings,
    to_model: str,
    *,
    domains: list[str] | None = None,
    rebuild_memory: bool = True,
    cfg: TransferConfig | None = None,
) -> MigrationReport:
    started = time.monotonic()
    cfg = cfg or TransferConfig()
    target = migration_settings(settings, to_model)
    old = wiring.encoder(settings)
    new = wiring.encoder(target)
    if new.fingerprint == old.fingerprint:
        raise ValueError(f"{to_model} is the base already served ({old.fingerprint[:12]})")
    report = MigrationReport(old.fingerprint, new.fingerprint, str(new.model_path), None)
    if rebuild_memory:
        key_encoder = new if target.runtime == "torch" else wiring.key_encoder(target)
        # The rebuild waits on the *live* writer's group (its catch-up protocol); only the keys are new.
        rebuild_settings = settings.model_copy(update={"model_path": target.model_path})
        report.memory = Rebuilder(rebuild_settings, encoder=key_encoder).run()
    redis_cfg = settings.redis()
    registry = RegistryStore(connect(redis_cfg), redis_cfg)
    buffers = ReplayBuffers(settings.state_dir.resolve() / "learner" / "buffers")
    for domain, version in sorted(registry.active().items()):
        if domains and domain not in domains:
            continue
        examples = buffers.examples(domain)
        if not examples:
            report.skipped[domain] = "the replay buffer holds no examples"
            continue
        teacher = load_artifact(
            settings.artifacts_dir / domain / version, base_fingerprint=old.fingerprint, dim=old.dim
        )
        result = transfer_adapter(old, teacher, new, examples, cfg)
        published = publish_transfer(
            settings.artifacts_dir, teacher, result, new, cfg, comp=settings.compensation()
        )
        report.adapters[domain] = {
            "version": published.manifest.version,
            "parent": version,
            "metrics": published.manifest.metrics,
        }
        log.info(
            "domain %s: %s -> %s on %s", domain, version, published.manifest.version, new.fingerprint[:12]
        )
    report.seconds = time.monotonic() - started
    report.plan = str(_write_plan(settings, report))
    return report


def _write_plan(settings: Settings, report: MigrationReport) -> Path:
    folder = settings.state_dir.resolve() / "migrations"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{report.to_fingerprint[:12]}.json"
    body = {
        "from_fingerprint": report.from_fingerprint,
        "to_fingerprint": report.to_fingerprint,
        "to_model_path": report.to_model_path,
        "memory_generation": report.memory.generation if report.memory else None,
        "memory": asdict(report.memory) if report.memory else None,
        "adapters": report.adapters,
        "skipped": report.skipped,
        "created_at": time.time(),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(body, indent=2))
    os.replace(tmp, path)
    return path
