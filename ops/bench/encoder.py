"""``driftserve bench encoder``: base-embedding throughput on the CPU, torch vs ONNX Runtime, with the
bundled all-MiniLM-L6-v2, at batch 1, 8 and 32 of 128-token texts, in the same run.

Each figure is ``encode(texts)`` end to end (tokenize, forward, mean-pool, L2-normalise) as serving calls
it, in sequences per second: the median of timed rounds after warm-up, the two runtimes alternating
round by round so that a shared machine's load falls on both alike. The same run reports the largest
absolute difference between the two runtimes' unit-norm embeddings, and the export verification's.

Usage: python -m ops.bench.encoder --out DIR [--seconds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

BATCHES = (1, 8, 32)
TOKENS = 128


def _texts(n: int, seed: int) -> list[str]:
    """Texts of well over 128 tokens from the model's own vocabulary: every one is cut at max_length."""
    from serving.encoder import default_model_path

    words = [
        w
        for w in (Path(default_model_path()) / "vocab.txt").read_text().split()
        if w.isalpha() and w.isascii() and len(w) >= 4
    ]
    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(200)) for _ in range(n)]


def _paired(runtimes: dict[str, Any], texts: list[str], seconds: float) -> dict[str, dict[str, float]]:
    """Alternate the runtimes round by round, so that on a shared machine both see the same load."""
    for encode in runtimes.values():
        for _ in range(2):
            encode(texts)
    rounds: dict[str, list[float]] = {name: [] for name in runtimes}
    deadline = time.perf_counter() + seconds
    done = 0
    while done < 5 or (time.perf_counter() < deadline and done < 200):
        done += 1
        for name, encode in runtimes.items():
            t = time.perf_counter()
            encode(texts)
            rounds[name].append(time.perf_counter() - t)
    out = {}
    for name, times in rounds.items():
        med = float(np.median(times))
        out[name] = {"rounds": len(times), "median_s": med, "seq_per_s": len(texts) / med}
    return out


def run(out_dir: str | Path, *, seconds: float = 8.0, cache_dir: str | Path | None = None) -> dict:
    """Run the benchmark, write ``encoder.json``, ``encoder.md`` and ``encoder.png`` to ``out_dir``."""
    import onnxruntime as ort
    import torch

    from serving.encoder import Encoder
    from serving.onnx_encoder import OnnxEncoder

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    torch_enc = Encoder(max_length=TOKENS, batch_size=max(BATCHES))
    t = time.perf_counter()
    onnx_enc = OnnxEncoder(max_length=TOKENS, batch_size=max(BATCHES), cache_dir=cache_dir)
    onnx_load_s = time.perf_counter() - t
    texts = _texts(max(BATCHES), seed=0)
    assert onnx_enc.tokenize(texts[:1])["input_ids"].shape[1] == TOKENS

    parity = float(np.abs(torch_enc.encode(texts) - onnx_enc.encode(texts)).max())
    rows = []
    runtimes = {"torch": torch_enc.encode, "onnx": onnx_enc.encode}
    for batch in BATCHES:
        chunk = texts[:batch]
        rows.append({"batch": batch, **_paired(runtimes, chunk, seconds)})
    result: dict[str, Any] = {
        "benchmark": "encoder",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "model": {"path": torch_enc.model_path, "fingerprint": torch_enc.fingerprint[:12], "tokens": TOKENS},
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "torch_threads": torch.get_num_threads(),
        "onnx": {
            "providers": onnx_enc.providers,
            "file": str(onnx_enc.onnx_path),
            "load_or_export_s": onnx_load_s,
            "verification_max_abs_diff": onnx_enc.max_abs_diff,
            "tolerance": onnx_enc.tolerance,
        },
        "parity_max_abs_diff_on_bench_texts": parity,
        "rows": rows,
        "speedup_onnx_over_torch": {
            str(r["batch"]): r["onnx"]["seq_per_s"] / r["torch"]["seq_per_s"] for r in rows
        },
    }
    (out / "encoder.json").write_text(json.dumps(result, indent=2))
    (out / "encoder.md").write_text(_markdown(result))
    _plot(result, out / "encoder.png")
    return result


def _markdown(r: dict[str, Any]) -> str:
    lines = [
        "# Encoder runtime benchmark (CPU)",
        "",
        f"all-MiniLM-L6-v2, {r['model']['tokens']} tokens, encode() end to end; {r['machine']['cpus']} CPUs "
        f"(load average {r['machine']['loadavg_start'][0]:.1f} at start, "
        f"{r['machine']['loadavg_end'][0]:.1f} at end); torch {r['versions']['torch']} "
        f"({r['torch_threads']} threads), onnxruntime {r['versions']['onnxruntime']} on "
        f"{', '.join(r['onnx']['providers'])}.",
        "",
        "| batch | torch seq/s | ONNX Runtime seq/s | speed-up |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for row in r["rows"]:
        t, o = row["torch"]["seq_per_s"], row["onnx"]["seq_per_s"]
        lines.append(f"| {row['batch']} | {t:.1f} | {o:.1f} | {o / t:.2f}x |")
    lines += [
        "",
        f"Export verification: max abs diff {r['onnx']['verification_max_abs_diff']:.2e} on unit-norm "
        f"embeddings (tolerance {r['onnx']['tolerance']:.0e}); on the benchmark texts "
        f"{r['parity_max_abs_diff_on_bench_texts']:.2e}.",
    ]
    return "\n".join(lines) + "\n"


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [row["batch"] for row in r["rows"]]
    x = np.arange(len(batches))
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.bar(x - 0.2, [row["torch"]["seq_per_s"] for row in r["rows"]], 0.4, label="torch (fp32)")
    ax.bar(x + 0.2, [row["onnx"]["seq_per_s"] for row in r["rows"]], 0.4, label="ONNX Runtime (fp32)")
    ax.set_xticks(x, [f"batch {b}" for b in batches])
    ax.set_ylabel(f"sequences/s at {r['model']['tokens']} tokens")
    ax.set_title("MiniLM-L6 base embedding on CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for encoder.json, encoder.md, encoder.png")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per batch size")
    parser.add_argument("--cache-dir", help="ONNX cache folder (default: ~/.cache/driftserve/onnx)")
    args = parser.parse_args(argv)
    result = run(args.out, seconds=args.seconds, cache_dir=args.cache_dir)
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
