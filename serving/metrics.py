"""Prometheus metrics, named ``driftserve_<noun>_<unit>`` with bounded label values.

In the embedded stack every process writes to one ``PROMETHEUS_MULTIPROC_DIR`` so that serving's
``/metrics`` shows the memory writer and learner too; without that variable each process has its own
registry.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

REQUESTS = Counter("driftserve_requests_total", "HTTP requests", ["endpoint", "status"])
LATENCY = Histogram(
    "driftserve_request_latency_seconds",
    "HTTP request latency",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
PREDICTIONS = Counter("driftserve_predictions_total", "texts predicted", ["source"])  # adapter|prototype|none
COMPENSATIONS = Counter("driftserve_compensations_total", "predictions changed by the error memory blend")
MEMORY_ENTRIES = Gauge(
    "driftserve_memory_entries", "entries in the replica's error memory", multiprocess_mode="liveall"
)
MEMORY_MIX_WEIGHT = Gauge(
    "driftserve_memory_mix_weight",
    "the memory's share beside the adapter's head per domain, learned online from labelled answers",
    ["domain"],
    multiprocess_mode="mostrecent",
)
COMPENSATION_SCALE = Gauge(
    "driftserve_compensation_scale",
    "per domain, the factor on the compensation blend for neighbours below sim_high, learned online",
    ["domain"],
    multiprocess_mode="mostrecent",
)
MEMORY_SYNC_ERRORS = Counter("driftserve_memory_sync_errors_total", "failed Redis reads while syncing")
ADAPTER_SERVED = Gauge(
    "driftserve_adapter_served_timestamp_seconds",
    "creation time of the adapter version each replica serves per domain",
    ["domain"],
    multiprocess_mode="liveall",
)
ADAPTER_CACHE = Counter(
    "driftserve_adapter_cache_total", "adapter cache events", ["event"]
)  # hit|miss|eviction
BATCH_SIZE = Histogram(
    "driftserve_batch_size", "texts per model batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
STAGE_LATENCY = Histogram(
    "driftserve_stage_latency_seconds",
    "time per serving stage and batch",
    ["stage"],  # encode | retrieval | adapter | compensation
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
)
RETRIEVAL = Counter("driftserve_retrieval_total", "routing of requests that name no domain", ["outcome"])
# The request path's fixed label sets, bound once (``labels()`` takes a lock and a lookup per call).
STAGE = {s: STAGE_LATENCY.labels(s) for s in ("encode", "retrieval", "adapter", "compensation")}
ROUTED, ROUTE_FALLBACK = RETRIEVAL.labels("routed"), RETRIEVAL.labels("fallback")
ADAPTER_SWAPS = Counter("driftserve_adapter_swaps_total", "adapter hot-swaps", ["outcome"])  # loaded|rejected
FEEDBACK_CONSUMED = Counter(
    "driftserve_feedback_consumed_total", "feedback messages consumed", ["consumer", "outcome"]
)  # outcome: applied|duplicate|dead_lettered|invalid
FEEDBACK_UNKNOWN_FIELDS = Counter(
    "driftserve_feedback_unknown_fields_total", "unknown fields ignored in feedback events"
)
FEEDBACK_KEYS = Counter(
    "driftserve_feedback_keys_total", "memory keys by source", ["source"]
)  # request_cache | encoded
CONSUMER_LAG = Gauge(
    "driftserve_consumer_lag_messages",
    "messages behind the log end",
    ["consumer"],
    multiprocess_mode="liveall",
)
CONSUMER_RETRIES = Counter("driftserve_consumer_retries_total", "batches rewound and retried", ["consumer"])
FEEDBACK_PRODUCED = Counter("driftserve_feedback_produced_total", "feedback accepted over HTTP", ["outcome"])
LEARNER_RUNS = Counter(
    "driftserve_learner_runs_total", "training runs", ["outcome"]
)  # submitted|discarded|failed|interrupted
LEARNER_REEVALUATIONS = Counter(
    "driftserve_learner_reevaluations_total",
    "candidates evaluated again because another version was promoted while they trained",
)
LEARNER_SECONDS = Histogram(
    "driftserve_learner_train_seconds",
    "wall time of one training run",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600),
)


ROLLOUT_ANSWERS = Counter(
    "driftserve_rollout_answers_total",
    "answers in domains with a candidate in flight",
    ["variant"],  # stable | canary | canary_error | shadow | shadow_dropped
)
ROLLOUT_STAGE = Gauge(
    "driftserve_rollout_stage",
    "rollout stage per domain: 0 none, 1 shadow, 2 canary",
    ["domain"],
    multiprocess_mode="mostrecent",
)
ROLLOUT_WEIGHT = Gauge(
    "driftserve_rollout_canary_weight",
    "canary traffic share per domain",
    ["domain"],
    multiprocess_mode="mostrecent",
)
ROLLOUT_TRANSITIONS = Counter(
    "driftserve_rollout_transitions_total", "registry decisions", ["type"]
)  # candidate|rejected|shadow|canary|promoted|rolled_back|paused|resumed|superseded|withdrawn
GATE_CHECKS = Counter(
    "driftserve_gate_checks_total", "offline gate checks", ["check", "result"]
)  # check: integrity|evaluated|accuracy|nfr|calibration|compatibility ; result: pass|fail
CANARY_ANALYSES = Counter(
    "driftserve_canary_analyses_total", "analysis intervals", ["stage", "result"]
)  # result: pass|fail|inconclusive
ROLLBACK_DRAIN = Histogram(
    "driftserve_rollback_drain_seconds",
    "from a rollback decision until every live replica stopped serving the candidate",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)


def render() -> tuple[bytes, str]:
    """The exposition text for /metrics: all processes of this node in multiprocess mode."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
