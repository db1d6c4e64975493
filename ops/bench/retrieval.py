"""``driftserve bench retrieval``: adapter retrieval accuracy on a mixed stream with the domain hidden.

Events of several labelled streams (one domain each) are interleaved; the first ``known`` events of each
domain become labelled feedback in the error memory (with their domain), and every later event is
routed by ``Predictor.route`` with its domain hidden. Reported: the share routed to the true domain,
per domain, and how often retrieval fell back to the default domain; plus the cost per routed request.
Uses the serving code in-process (no HTTP), with the real encoder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.compensator import CompensationConfig
from serving.encoder import Encoder
from serving.memory import InProcessMemory
from serving.predictor import Predictor, RetrievalConfig
from streams.redis_store import MemoryEntry


def _read(path: Path, n: int) -> list[dict]:
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:
        rows = [json.loads(line) for _, line in zip(range(n), fh, strict=False)]
    return rows


def run(streams: list[Path], out: Path, *, per_stream: int = 400, known: int = 100) -> dict[str, Any]:
    encoder = Encoder()
    memory = InProcessMemory(encoder.dim)
    predictor = Predictor(encoder, memory, CompensationConfig(), retrieval=RetrievalConfig())
    test: list[dict] = []
    for path in streams:
        rows = _read(path, per_stream)
        keys = encoder.encode([r["text"] for r in rows[:known]])
        memory.add(
            [
                MemoryEntry(r["id"], r["domain"], r["label"], keys[i], 0.0, "bench")
                for i, r in enumerate(rows[:known])
            ]
        )
        test += rows[known:]
    keys = encoder.encode([r["text"] for r in test])
    start = time.perf_counter()
    routed = [predictor.route(k) for k in keys]
    per_request_ms = (time.perf_counter() - start) / len(test) * 1000
    truth = [r["domain"] for r in test]
    chosen = [d for d, _ in routed]
    result: dict[str, Any] = {
        "streams": [p.name for p in streams],
        "known_per_domain": known,
        "routed_events": len(test),
        "accuracy": float(np.mean([c == t for c, t in zip(chosen, truth, strict=True)])),
        "fallback_share": float(np.mean([c == "default" for c in chosen])),
        "per_domain": {
            d: float(np.mean([c == t for c, t in zip(chosen, truth, strict=True) if t == d]))
            for d in sorted(set(truth))
        },
        "route_ms_per_request": per_request_ms,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "retrieval.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# driftserve bench retrieval",
        "",
        f"{len(test)} events routed with the domain hidden ({known} labelled per domain): "
        f"accuracy {result['accuracy']:.3f}, fallback {result['fallback_share']:.3f}, "
        f"{per_request_ms:.3f} ms per request",
        "",
    ] + [f"- {d}: {acc:.3f}" for d, acc in result["per_domain"].items()]
    (out / "retrieval.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(list(result["per_domain"]), list(result["per_domain"].values()))
    ax.set_ylim(0, 1)
    ax.set_ylabel("routed to the true domain")
    fig.tight_layout()
    fig.savefig(out / "retrieval.png", dpi=120)
    plt.close(fig)
    return result
