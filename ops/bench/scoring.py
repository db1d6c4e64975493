"""``python -m ops.bench.scoring``: prequential accuracy of serving's memory path (no adapter) on a
labelled stream, next to the replay baselines, on the same base-encoder embeddings, in one run.

Serving's own code answers: ``Predictor._finish_group`` over an ``InProcessMemory`` (the online experts of
``serving.scorer`` plus ReLoop2 compensation), with the scorer on and off (off: nearest class mean plus
compensation, the path before the scorer). The warm-up goes into the memory first; then each event is
predicted and only then stored, as if every earlier label had reached the memory (the replay's
feedback-to-memory lag, well under a second, is not modelled). Adapters are not part of this measure.

Usage: python -m ops.bench.scoring STREAM [--out DIR] [--cache DIR] [--warmup 0.1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from ops.replay.baselines import run_baselines
from ops.replay.embeddings import embed_texts
from ops.replay.stream import read_stream, split_warmup
from serving.compensator import CompensationConfig
from serving.memory import InProcessMemory
from serving.predictor import Predictor
from serving.scorer import ScorerConfig
from streams.redis_store import MemoryEntry
from streams.schemas import DEFAULT_DOMAIN


class _KeysOnly:
    """The Predictor needs an encoder only for its fingerprint here: keys come precomputed."""

    def __init__(self, fingerprint: str, dim: int) -> None:
        self.fingerprint, self.dim = fingerprint, dim


def memory_path_accuracy(
    emb: np.ndarray, labels: list[str], domains: list[str], n_warmup: int, scorer: ScorerConfig
) -> float:
    memory = InProcessMemory(emb.shape[1], scorer=scorer)
    predictor = Predictor(_KeysOnly("bench" * 8, emb.shape[1]), memory, CompensationConfig())  # type: ignore[arg-type]
    memory.add([MemoryEntry(f"w{i}", domains[i], labels[i], emb[i], 0.0, "v") for i in range(n_warmup)])
    correct = 0
    for i in range(n_warmup, len(labels)):
        (pred,) = predictor._finish_group(domains[i], emb[i : i + 1], None, None)
        correct += pred.label == labels[i]
        memory.add([MemoryEntry(f"e{i}", domains[i], labels[i], emb[i], 0.0, "v")])
    return correct / max(1, len(labels) - n_warmup)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ops.bench.scoring")
    parser.add_argument("stream")
    parser.add_argument("--out", default="bench-results/scoring")
    parser.add_argument("--cache", help="embedding cache directory (as driftserve replay's <out>/cache)")
    parser.add_argument("--warmup", type=float, default=0.1)
    args = parser.parse_args(argv)

    from serving.encoder import Encoder

    stream = read_stream(args.stream)
    events = stream.events
    n_warmup = split_warmup(events, args.warmup)
    encoder = Encoder()
    emb = embed_texts(encoder, [e.text for e in events], Path(args.cache) if args.cache else None)
    labels = [e.label for e in events]
    domains = [e.domain or DEFAULT_DOMAIN for e in events]
    result: dict[str, object] = {"stream": args.stream, "events": len(events), "warmup": n_warmup}
    truth = labels[n_warmup:]
    for name, preds in run_baselines(emb, labels, [e.domain for e in events], n_warmup).items():
        result[f"baseline_{name}"] = float(np.mean([p == t for p, t in zip(preds, truth, strict=True)]))
    for name, cfg in (("memory_scorer", ScorerConfig()), ("memory_ncm", ScorerConfig(enabled=False))):
        t0 = time.perf_counter()
        result[name] = memory_path_accuracy(emb, labels, domains, n_warmup, cfg)
        result[f"{name}_seconds"] = round(time.perf_counter() - t0, 2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = Path(args.stream).name.split(".")[0]
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
