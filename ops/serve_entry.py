"""Application builder for ``serve run`` / KubeRay ``serveConfigV2``: ``import_path: ops.serve_entry:app``.

Settings come from the environment (DRIFTSERVE_*), read when Serve calls the builder, not at import.
"""

from __future__ import annotations

from typing import Any

from ops.settings import load_settings
from ops.wiring import serving_config
from serving.app import build


def app(args: dict[str, Any] | None = None):
    settings = load_settings(**(args or {}))
    return build(
        serving_config(settings),
        num_replicas=settings.num_replicas,
        num_cpus=settings.replica_num_cpus,
        num_gpus=settings.replica_num_gpus,
    )
