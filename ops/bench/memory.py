"""``driftserve bench memory``: error-memory lookup latency from 1k to 1M entries, exact vs ANN (HNSW) vs
an inverted file with SimHash pre-ranking and exact re-ranking (ivf), the cost of compensation relative
to the model's forward pass, and how far each kind's compensated outcome agrees with exact search, all in
the same run.

- data: clustered unit vectors of the encoder's width (384) with a low-dimensional structure, like
  sentence embeddings (a query's nearest neighbours at cosine ~0.85, its 32nd at ~0.75), one domain,
  20 labels that follow the clusters; queries are fresh draws from the same distribution;
- lookup: ``memory.search(domain, query, k=32)`` on one thread, p50/p99 over the queries;
- overhead: ``search`` + ``serving.compensator.compensate`` for one request, as a share of the bundled
  MiniLM's forward pass for one text (``serving.encoder.Encoder().encode([text])``);
- recall@k of the ANN and IVF memories against exact search, by similarity (a returned neighbour counts
  when its exact cosine reaches the k-th exact one), and a small sweep of the HNSW search width at the
  largest size;
- interleaved lookups: each kind's memory at the smallest size stays alive and every query at a larger
  size is timed on both, alternately, so the ratio of the two p50s sees the same machine load (a shared
  machine's load swings by minutes; sequential measurements do not compare);
- compensation quality on near-duplicate queries (stored keys perturbed to cosine 0.92-0.99, with a
  random model distribution): per kind, the share of queries whose compensated argmax agrees with exact
  search's, the accuracy of each against the stored entry's label, the mean lambda and the mean total
  variation distance from exact's compensated distribution; the same agreement on fresh queries.

Usage: python -m ops.bench.memory --out DIR [--sizes 1000,10000,100000,1000000] [--queries 300]
       [--kinds exact,ann,ivf]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from serving.ann_memory import AnnMemory
from serving.compensator import CompensationConfig, compensate
from serving.ivf_memory import SKETCH_BITS, IvfMemory
from serving.memory import InProcessMemory, make_memory
from streams.redis_store import MemoryEntry

DIM = 384
K = 32
N_LABELS = 20
DOMAIN = "bench"
OVERHEAD_TARGET_PCT = 10.0
RATIO_TARGET = 3.0
SHORT_TEXT = "the battery died after two days and support never answered my emails about a replacement"
KINDS = ["exact", "ann", "ivf"]
SWEEP = [(32, 32), (48, 48), (64, 64), (128, 96)]  # (expansion_search, candidates); the default is 64/64


def clustered(n: int, dim: int, seed: int, clusters: int = 2000, chunk: int = 100_000) -> np.ndarray:
    """Unit vectors around shared cluster centres in a 32-dimensional latent space projected to ``dim``
    plus isotropic noise; returns float32 (n, dim) and never holds a float64 copy of the whole set."""
    latent = 32
    basis = np.random.default_rng(1234).standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
    centres = np.random.default_rng(99).standard_normal((clusters, latent), dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        z = centres[rng.integers(0, clusters, m)] + 0.6 * rng.standard_normal((m, latent), dtype=np.float32)
        x = z @ basis + 0.15 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def _cluster_labels(x: np.ndarray) -> list[str]:
    """Labels that follow the data: the sign pattern of a few fixed directions, folded to 20 classes."""
    dirs = np.random.default_rng(7).standard_normal((x.shape[1], 5), dtype=np.float32)
    codes = (x @ dirs > 0).astype(np.int64) @ (1 << np.arange(5))
    return [f"class-{c % N_LABELS:02d}" for c in codes.tolist()]


def _pcts(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values) * 1e6
    return {
        "n": len(values),
        "p50_us": float(np.percentile(arr, 50)),
        "p99_us": float(np.percentile(arr, 99)),
        "mean_us": float(arr.mean()),
    }


def _rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def model_time(repeats: int = 40) -> dict[str, Any]:
    """p50 of the bundled MiniLM's forward pass for one text (tokenize + forward + pool), CPU."""
    import torch

    from serving.encoder import Encoder

    enc = Encoder()
    long_text = " ".join(["drift"] * 400)  # truncated at max_length: a full 128-token input
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    for name, text in (("short", SHORT_TEXT), ("128_tokens", long_text)):
        tokens = int(enc.tokenize([text])["input_ids"].shape[1])
        for _ in range(5):
            enc.encode([text])
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            enc.encode([text])
            times.append(time.perf_counter() - t)
        out[name] = {"tokens": tokens, **_pcts(times)}
    return out


def _lookup(mem: InProcessMemory, q: np.ndarray) -> tuple[np.ndarray, list[str]]:
    return mem.search(DOMAIN, q, K)


def _measure(
    mem: InProcessMemory, queries: np.ndarray, probs: list[dict[str, float]], cfg: CompensationConfig
) -> tuple[dict[str, float], dict[str, float], list[np.ndarray]]:
    for q in queries[:10]:
        _lookup(mem, q)
    lookup, overhead, sims_out = [], [], []
    for q, p in zip(queries, probs, strict=False):
        t0 = time.perf_counter()
        sims, labels = _lookup(mem, q)
        t1 = time.perf_counter()
        compensate(p, sims, labels, cfg)
        t2 = time.perf_counter()
        lookup.append(t1 - t0)
        overhead.append(t2 - t0)
        sims_out.append(sims)
    return _pcts(lookup), _pcts(overhead), sims_out


def _interleaved(small: InProcessMemory, large: InProcessMemory, queries: np.ndarray) -> dict[str, Any]:
    """p50 lookups of the smallest and a larger memory, timed alternately query by query."""
    for q in queries[:10]:
        _lookup(small, q)
        _lookup(large, q)
    t_small, t_large = [], []
    for q in queries:
        t0 = time.perf_counter()
        _lookup(small, q)
        t1 = time.perf_counter()
        _lookup(large, q)
        t2 = time.perf_counter()
        t_small.append(t1 - t0)
        t_large.append(t2 - t1)
    a, b = _pcts(t_small), _pcts(t_large)
    return {"smallest": a, "this_size": b, "ratio_p50": b["p50_us"] / a["p50_us"]}


def near_duplicates(data: np.ndarray, n: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` queries at cosine 0.92-0.99 to stored keys among the first ``n``; returns them and the
    rows they were made from."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(n, size=min(count, n), replace=False)
    base = data[rows].astype(np.float64)
    noise = rng.standard_normal(base.shape)
    noise -= (noise * base).sum(axis=1, keepdims=True) * base
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    cos = rng.uniform(0.92, 0.99, size=(len(rows), 1))
    q = cos * base + np.sqrt(1 - cos**2) * noise
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32), rows


def _outcomes(
    mem: InProcessMemory, queries: np.ndarray, probs: list[dict[str, float]], cfg: CompensationConfig
) -> list[tuple[dict[str, float], float]]:
    out = []
    for q, p in zip(queries, probs, strict=False):
        sims, labels = _lookup(mem, q)
        out.append(compensate(p, sims, labels, cfg))
    return out


def _quality(
    found: list[tuple[dict[str, float], float]],
    truth: list[tuple[dict[str, float], float]],
    probs: list[dict[str, float]],
    stored: list[str] | None,
) -> dict[str, float]:
    """Agreement of compensated argmax with exact search's, accuracy against the stored labels (if the
    queries are near-duplicates), mean lambda of both, and the mean total variation distance."""
    m = min(len(found), len(truth))

    def top(d: dict[str, float]) -> str:
        return max(d, key=lambda k: d[k])

    agree = [top(found[i][0]) == top(truth[i][0]) for i in range(m)]
    tv = [
        0.5
        * sum(
            abs(found[i][0].get(k, 0.0) - truth[i][0].get(k, 0.0))
            for k in set(found[i][0]) | set(truth[i][0])
        )
        for i in range(m)
    ]
    out = {
        "queries": m,
        "argmax_agreement": float(np.mean(agree)),
        "mean_lambda": float(np.mean([found[i][1] for i in range(m)])),
        "mean_lambda_exact": float(np.mean([truth[i][1] for i in range(m)])),
        "mean_tv_distance": float(np.mean(tv)),
    }
    if stored is not None:
        out["accuracy"] = float(np.mean([top(found[i][0]) == stored[i] for i in range(m)]))
        out["accuracy_exact"] = float(np.mean([top(truth[i][0]) == stored[i] for i in range(m)]))
        out["accuracy_uncompensated"] = float(np.mean([top(probs[i]) == stored[i] for i in range(m)]))
    return out


def _recall(found: list[np.ndarray], truth: list[np.ndarray]) -> float:
    hits = [int(np.sum(f >= t[-1] - 1e-6)) / len(t) for f, t in zip(found, truth, strict=False) if len(t)]
    return float(np.mean(hits)) if hits else float("nan")


def run(
    out_dir: str | Path,
    sizes: list[int] | None = None,
    *,
    queries: int = 300,
    seed: int = 0,
    kinds: list[str] | None = None,
) -> dict:
    """Run the benchmark, write ``memory.json``, ``memory.md`` and ``memory.png`` to ``out_dir``."""
    sizes = sorted(sizes or [1000, 10_000, 100_000, 1_000_000])
    kinds = [k for k in KINDS if k in (kinds or KINDS)]
    if "exact" not in kinds:
        raise ValueError("the benchmark needs 'exact' among the kinds: it is the reference for quality")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_start = os.getloadavg()
    model = model_time()
    gc.collect()

    data = clustered(sizes[-1], DIM, seed=seed)
    labels = _cluster_labels(data)
    qs = clustered(queries, DIM, seed=seed + 1)
    rng = np.random.default_rng(seed + 2)
    vocab = sorted(set(labels))
    probs = []
    for _ in range(queries):
        z = rng.standard_normal(len(vocab)) * 2
        p = np.exp(z - z.max())
        probs.append(dict(zip(vocab, (p / p.sum()).tolist(), strict=True)))
    cfg = CompensationConfig(k=K)
    # The model is timed again after the lookups and the faster p50 is the yardstick: on a shared machine
    # that is the conservative choice for "overhead as a share of model time".
    lookups: list[tuple[dict[str, Any], dict[str, float]]] = []

    rows: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    smallest: dict[str, InProcessMemory] = {}  # each kind at the smallest size, for interleaved timing
    for n in sizes:
        entries = [MemoryEntry(f"e{i}", DOMAIN, labels[i], data[i], 0.0, "bench") for i in range(n)]
        n_exact = queries if n <= 100_000 else min(queries, 100)  # 1M exact lookups take ~0.1-0.3 s each
        dup_q, dup_rows = near_duplicates(data, n, n_exact, seed=seed + 3 + n)
        dup_labels = [labels[i] for i in dup_rows]
        row: dict[str, Any] = {"n": n}
        truth: list[np.ndarray] = []
        ref_dup: list[tuple[dict[str, float], float]] = []
        ref_fresh: list[tuple[dict[str, float], float]] = []
        for kind in kinds:
            rss0 = _rss_mb()
            mem = make_memory(kind, DIM)
            t = time.perf_counter()
            mem.add(entries)
            mem.wait_indexed()  # a graph builds in the background: the build is part of the cost
            build_s = time.perf_counter() - t
            nq = n_exact if kind == "exact" else queries
            lookup, overhead, found = _measure(mem, qs[:nq], probs[:nq], cfg)
            res: dict[str, Any] = {
                "build_s": build_s,
                "lookup": lookup,
                "lookup_plus_compensate": overhead,
                "rss_delta_mb": _rss_mb() - rss0,
            }
            lookups.append((res, overhead))
            if n == sizes[0]:
                smallest[kind] = mem
            else:
                res["interleaved_with_smallest"] = _interleaved(smallest[kind], mem, qs[:nq])
            dup = _outcomes(mem, dup_q, probs, cfg)
            fresh = _outcomes(mem, qs[:n_exact], probs, cfg)
            if kind == "exact":
                truth, ref_dup, ref_fresh = found, dup, fresh
            res["quality_near_duplicates"] = _quality(dup, ref_dup, probs, dup_labels)
            res["quality_fresh"] = _quality(fresh, ref_fresh, probs, None)
            if isinstance(mem, AnnMemory):
                res["path"] = "hnsw" if mem.indexed_domains() else "exact (below the index threshold)"
                res["recall_at_32"] = _recall(found[:n_exact], truth)
                res["memory_bytes"] = mem.memory_bytes()
                if n == sizes[-1] and mem.indexed_domains():
                    for ef, cand in SWEEP:
                        mem.set_search(expansion_search=ef, candidates=cand)
                        s_lookup, _, s_found = _measure(mem, qs[:n_exact], probs[:n_exact], cfg)
                        sweep.append(
                            {
                                "expansion_search": ef,
                                "candidates": cand,
                                "lookup": s_lookup,
                                "recall_at_32": _recall(s_found, truth),
                            }
                        )
            elif isinstance(mem, IvfMemory):
                res["path"] = "ivf" if mem.indexed_domains() else "exact (below the index threshold)"
                res["recall_at_32"] = _recall(found[:n_exact], truth)
                res["memory_bytes"] = mem.memory_bytes()
            row[kind] = res
            del mem
            gc.collect()
        rows.append(row)
        del entries
        gc.collect()
    smallest.clear()

    model_end = model_time()
    model_p50 = min(model["short"]["p50_us"], model_end["short"]["p50_us"])
    model = {"start": model, "end": model_end, "yardstick_p50_us": model_p50}
    for res, overhead in lookups:
        res["overhead_pct_of_model"] = 100 * overhead["p50_us"] / model_p50

    first, last = rows[0], rows[-1]
    ratio = {k: last[k]["lookup"]["p50_us"] / first[k]["lookup"]["p50_us"] for k in kinds}
    interleaved = {k: last[k]["interleaved_with_smallest"]["ratio_p50"] for k in kinds if len(rows) > 1}
    at_100k = next((r for r in rows if r["n"] == 100_000), None)
    result: dict[str, Any] = {
        "benchmark": "memory",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": load_start,
            "loadavg_end": os.getloadavg(),
        },
        "config": {
            "dim": DIM,
            "k": K,
            "queries": queries,
            "labels": N_LABELS,
            "kinds": kinds,
            "ann": {
                "library": "usearch",
                "dtype": "i8",
                "connectivity": 16,
                "expansion_add": 64,
                "expansion_search": 64,
                "candidates": 64,
                "exact_below": 20_000,
            },
            "ivf": _ivf_config(),
        },
        "model": model,
        "sizes": rows,
        "ratio_p50_largest_over_smallest": {"sizes": [first["n"], last["n"]], **ratio},
        "ratio_p50_interleaved": {"sizes": [first["n"], last["n"]], **interleaved},
        "sweep_at_largest": sweep,
        "targets": {
            "overhead_pct_at_100k_ann": at_100k["ann"]["overhead_pct_of_model"]
            if at_100k and "ann" in at_100k
            else None,
            "overhead_target_pct": OVERHEAD_TARGET_PCT,
            "ratio_ann": ratio.get("ann"),
            "ratio_ivf": ratio.get("ivf"),
            "ratio_ivf_interleaved": interleaved.get("ivf"),
            "ratio_target": RATIO_TARGET,
        },
        "wall_s": time.time() - started,
    }
    (out / "memory.json").write_text(json.dumps(result, indent=2))
    (out / "memory.md").write_text(_markdown(result))
    _plot(result, out / "memory.png")
    return result


def _ivf_config() -> dict[str, Any]:
    mem = IvfMemory(DIM)
    return {
        "lists": "sqrt(entries)",
        "pool": mem.pool,
        "max_probes": mem.max_probes,
        "sketch_bits": SKETCH_BITS,
        "candidates": mem.candidates,
        "exact_below": mem.exact_below,
        "max_delta": mem.max_delta,
        "kmeans_iterations": mem.kmeans_iterations,
    }


def _markdown(r: dict[str, Any]) -> str:
    m = r["model"]["start"]
    kinds = r["config"]["kinds"]
    ivf = r["config"]["ivf"]
    lines = [
        "# Error-memory lookup benchmark",
        "",
        f"Machine: {r['machine']['cpus']} CPUs, load average {r['machine']['loadavg_start'][0]:.1f} "
        "at start, "
        f"{r['machine']['loadavg_end'][0]:.1f} at end. Dim {r['config']['dim']}, k={r['config']['k']}, "
        f"{r['config']['queries']} queries. ANN: usearch HNSW (int8, M=16, ef=64, 64 candidates re-scored "
        f"exactly), exact scan below 20k entries per domain. IVF: sqrt(entries) k-means lists probed "
        f"until {ivf['pool']} rows, the {ivf['candidates']} nearest by {ivf['sketch_bits']}-bit SimHash "
        f"re-scored exactly; exact scan below {ivf['exact_below']} entries.",
        "",
        f"Model time (MiniLM, CPU, one text, p50 at start / end): {m['short']['p50_us'] / 1000:.2f} / "
        f"{r['model']['end']['short']['p50_us'] / 1000:.2f} ms for {m['short']['tokens']} tokens "
        f"(the smaller is the yardstick for '% of model'), {m['128_tokens']['p50_us'] / 1000:.2f} ms for "
        "128 tokens.",
        "",
        "| entries | kind | path | build s | lookup p50 µs | lookup p99 µs | +compensate p50 µs "
        "| % of model | recall@32 | interleaved p50 µs (smallest / this) |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in r["sizes"]:
        for kind in kinds:
            x = row[kind]
            inter = x.get("interleaved_with_smallest")
            inter_s = (
                f"{inter['smallest']['p50_us']:.0f} / {inter['this_size']['p50_us']:.0f}" if inter else "-"
            )
            recall = (
                f"{x['recall_at_32']:.4f}" if "recall_at_32" in x else ("1.0000" if kind == "exact" else "-")
            )
            lines.append(
                f"| {row['n']:,} | {kind} | {x.get('path', 'exact')} | {x['build_s']:.1f} "
                f"| {x['lookup']['p50_us']:.0f} | {x['lookup']['p99_us']:.0f} "
                f"| {x['lookup_plus_compensate']['p50_us']:.0f} | {x['overhead_pct_of_model']:.2f} "
                f"| {recall} | {inter_s} |"
            )
    ratio = r["ratio_p50_largest_over_smallest"]
    inter = r["ratio_p50_interleaved"]
    lines += [
        "",
        f"p50 lookup at {ratio['sizes'][1]:,} / at {ratio['sizes'][0]:,} (target <= {RATIO_TARGET}): "
        + ", ".join(
            f"{k} {ratio[k]:.2f} (interleaved {inter[k]:.2f})" if k in inter else f"{k} {ratio[k]:.2f}"
            for k in kinds
        )
        + ".",
        "",
        "Compensation quality against exact search. Near-duplicates: stored keys perturbed to cosine "
        "0.92-0.99, random model distribution; accuracy against the stored entry's label. Fresh: new "
        "draws from the data distribution.",
        "",
        "| entries | kind | near-dup argmax agreement | accuracy (kind / exact / uncompensated) "
        "| mean λ (kind / exact) | mean TV distance | fresh argmax agreement |",
        "| ---: | --- | ---: | --- | --- | ---: | ---: |",
    ]
    for row in r["sizes"]:
        for kind in kinds:
            d, f = row[kind]["quality_near_duplicates"], row[kind]["quality_fresh"]
            lines.append(
                f"| {row['n']:,} | {kind} | {d['argmax_agreement']:.3f} | {d['accuracy']:.3f} / "
                f"{d['accuracy_exact']:.3f} / {d['accuracy_uncompensated']:.3f} | {d['mean_lambda']:.3f} / "
                f"{d['mean_lambda_exact']:.3f} | {d['mean_tv_distance']:.3f} | {f['argmax_agreement']:.3f} |"
            )
    if r["sweep_at_largest"]:
        lines += [
            "",
            "HNSW search width at the largest size:",
            "",
            "| expansion_search | candidates | p50 µs | p99 µs | recall@32 |",
            "| ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in r["sweep_at_largest"]:
            lines.append(
                f"| {s['expansion_search']} | {s['candidates']} | {s['lookup']['p50_us']:.0f} "
                f"| {s['lookup']['p99_us']:.0f} | {s['recall_at_32']:.4f} |"
            )
    return "\n".join(lines) + "\n"


def _plot(r: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = [row["n"] for row in r["sizes"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {"exact": "tab:red", "ann": "tab:blue", "ivf": "tab:green"}
    for kind in r["config"]["kinds"]:
        colour = colours[kind]
        p50 = [row[kind]["lookup"]["p50_us"] for row in r["sizes"]]
        p99 = [row[kind]["lookup"]["p99_us"] for row in r["sizes"]]
        pct = [row[kind]["overhead_pct_of_model"] for row in r["sizes"]]
        ax1.plot(ns, p50, "o-", color=colour, label=f"{kind} p50")
        ax1.plot(ns, p99, "o--", color=colour, label=f"{kind} p99")
        ax2.plot(ns, pct, "o-", color=colour, label=kind)
    ax1.set(xscale="log", yscale="log", xlabel="entries in the domain", ylabel="lookup latency (µs)")
    ax1.set_title("memory lookup, k=32, one thread")
    ax1.legend(fontsize=8)
    ax2.axhline(OVERHEAD_TARGET_PCT, color="grey", linestyle=":", label="10% target")
    ax2.set(xscale="log", yscale="log", xlabel="entries in the domain", ylabel="% of one-text forward (p50)")
    ax2.set_title("search + compensate vs MiniLM forward")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for memory.json, memory.md, memory.png")
    parser.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated entry counts")
    parser.add_argument("--queries", type=int, default=300, help="queries per size (exact at >100k: 100)")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="memory kinds to compare (exact is required)"
    )
    args = parser.parse_args(argv)
    result = run(
        args.out,
        [int(x) for x in args.sizes.split(",")],
        queries=args.queries,
        kinds=args.kinds.split(","),
    )
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
