"""What a serving replica needs to know, as one picklable object built by ``ops`` from Settings."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from serving.compensator import CompensationConfig
from streams.kafka_io import KafkaConfig
from streams.redis_store import RedisConfig


@dataclass(frozen=True)
class ServingConfig:
    artifacts_dir: Path
    model_path: str | None = None
    device: str = "cpu"
    max_length: int = 128
    max_body_bytes: int = 1_000_000
    max_batch_texts: int = 64
    sync_interval_s: float = 0.2
    batch_max_size: int = 32
    batch_wait_timeout_s: float = 0.005
    adapter_cache_size: int = 16
    adapter_pinned_domains: tuple[str, ...] = ()
    memory_index: str = "ann"  # exact | ann (exact below 20k entries per domain, HNSW above) | ivf
    runtime: str = "torch"  # torch | onnx (the adapter-free key path; adapters always run on torch)
    onnx_cache_dir: Path | None = None
    admin_token: str | None = None  # bearer token of the /admin endpoints; None disables them
    shadow_queue_size: int = 256  # mirrored requests waiting for the shadow candidate; beyond: dropped
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    compensation: CompensationConfig = field(default_factory=CompensationConfig)
