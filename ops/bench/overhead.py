"""``driftserve bench overhead``: what compensation and adapter retrieval add to the model's time on the
serving path, with 100k error-memory entries, per memory index, in one run.

- the serving objects themselves: ``serving.predictor.Predictor`` over a memory from
  ``serving.memory.make_memory(kind)``, with the runtime a replica uses for the memory keys (ONNX Runtime
  on one intra-op thread, as each replica runs it; ``--runtime torch`` for the torch encoder);
- memory: ``entries`` entries over ``domains`` domains, added through ``memory.add`` (the online experts
  learn them as a replica's sync thread does). Their keys are real embeddings of ``base_texts`` texts, each
  domain's texts drawn from its own slice of the vocabulary and each class's around its own topic words,
  and every stored key is one of them with noise (cosine 0.82-0.96 to its source): near-duplicates exist,
  so compensation fires as it does in production;
- requests name no domain, so every one is routed: fresh texts of the same domains and, one in four, a
  stored text (a near-duplicate of stored keys);
- two ways of serving the routed domains: ``memory`` (no adapter yet: the online experts over the memory
  are the head) and ``adapter`` (a LoRA adapter + head per domain, trained here on a few of its stored
  texts, mixed with the memory's experts and compensated, as a promoted version is served);
- per batch size, round by round on the same texts: the model (the memory key's forward, ``encode``:
  tokenize, forward, pool; with adapters also the adapter's forward inside ``predict``, timed where it
  runs) and the rest of ``Predictor.predict`` (routing, memory search, the online experts, the head,
  compensation, the served-mix record, building the answers). overhead = p50(rest) / p50(model).

Usage: driftserve bench overhead --out DIR [--entries 100000] [--kinds exact,ann,ivf] [--batches 1,4,16]
       [--no-adapters] (the runtime and model are the settings', e.g. --runtime torch)
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np

TARGET_PCT = 10.0
CLASSES = 8


class _TimedEncoder:
    """The serving encoder, adding up the time of its forwards (the adapters', inside ``predict``)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.seconds = 0.0

    def encode(self, texts: list[str], adapter: str | None = None) -> np.ndarray:
        t = time.perf_counter()
        try:
            return self._inner.encode(texts, adapter=adapter)
        finally:
            self.seconds += time.perf_counter() - t

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _KnownKeys:
    """A key encoder that returns keys computed beforehand: ``predict`` then costs only what follows."""

    def __init__(self, dim: int, fingerprint: str) -> None:
        self.dim, self.fingerprint = dim, fingerprint
        self.keys: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        return np.stack([self.keys[t] for t in texts])


def corpus(domains: int, per_domain: int, seed: int) -> list[tuple[str, str, str]]:
    """(text, domain, label): each domain's words come from its own slice of the vocabulary, each class
    repeats a few topic words of its own, so domains and classes are separable by their embeddings."""
    from serving.encoder import default_model_path

    vocab = [
        w
        for w in (Path(default_model_path()) / "vocab.txt").read_text().split()
        if w.isalpha() and w.isascii() and len(w) >= 4
    ]
    random.Random(3).shuffle(vocab)
    rng = random.Random(seed)
    width = len(vocab) // domains
    out = []
    for d in range(domains):
        words = vocab[d * width : (d + 1) * width]
        topics = [words[c * 4 : c * 4 + 4] for c in range(CLASSES)]
        filler = words[CLASSES * 4 :]
        for i in range(per_domain):
            c = i % CLASSES
            text = rng.sample(filler, rng.randint(6, 20)) + rng.choices(topics[c], k=3)
            rng.shuffle(text)
            out.append((" ".join(text), f"dom{d}", f"dom{d}-class{c}"))
    return out


def _noisy(keys: np.ndarray, copies: int, rng: np.random.Generator) -> np.ndarray:
    """``copies`` noisy versions of each key, at cosine 0.82-0.96 to it."""
    rep = np.repeat(keys, copies, axis=0)
    scale = rng.uniform(0.3, 0.7, size=(len(rep), 1)).astype(np.float32)
    noise = rng.standard_normal(rep.shape, dtype=np.float32) / np.sqrt(rep.shape[1])
    out = rep + scale * noise
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _p50_ms(values: list[float]) -> float:
    return float(np.percentile(np.asarray(values) * 1000, 50))


def measure(
    predictor: Any,
    model: Any,
    batches: list[list[str]],
    seconds: float,
    min_rounds: int = 20,
) -> dict[str, Any]:
    """Model and rest round by round over ``batches``, so a shared machine's load falls on both.
    ``predictor.encoder`` must be a ``_TimedEncoder``: its forwards inside ``predict`` are model time."""
    timed = predictor.encoder
    model_t, rest_t, route_t = [], [], []
    compensated = routed = answered = adapter = 0
    for texts in batches[:3]:  # warm-up
        predictor.predict(texts, [None] * len(texts))
    deadline = time.perf_counter() + seconds
    i = 0
    while i < min_rounds or (time.perf_counter() < deadline and i < 20 * min_rounds):
        texts = batches[i % len(batches)]
        i += 1
        t0 = time.perf_counter()
        keys = model.encode(texts)
        t1 = time.perf_counter()
        before = timed.seconds
        preds = predictor.predict(texts, [None] * len(texts))
        t2 = time.perf_counter()
        predictor.route_batch(keys)
        t3 = time.perf_counter()
        inside = timed.seconds - before
        model_t.append(t1 - t0 + inside)
        rest_t.append(t2 - t1 - inside)
        route_t.append(t3 - t2)
        answered += len(preds)
        compensated += sum(p.compensated for p in preds)
        routed += sum(p.domain != "default" for p in preds)
        adapter += sum(p.adapter is not None for p in preds)
    model_ms, rest_ms = _p50_ms(model_t), _p50_ms(rest_t)
    return {
        "rounds": i,
        "model_p50_ms": model_ms,
        "rest_p50_ms": rest_ms,
        "rest_p99_ms": float(np.percentile(np.asarray(rest_t) * 1000, 99)),
        "route_p50_ms": _p50_ms(route_t),
        "overhead_pct": 100.0 * rest_ms / model_ms,
        "compensated_share": compensated / answered,
        "routed_share": routed / answered,
        "adapter_share": adapter / answered,
    }


def run(
    out: Path,
    *,
    entries: int = 100_000,
    domains: int = 4,
    base_texts: int = 2000,
    queries: int = 480,
    kinds: tuple[str, ...] = ("exact", "ann", "ivf"),
    batch_sizes: tuple[int, ...] = (1, 4, 16),
    seconds: float = 8.0,
    runtime: str = "onnx",
    model_path: str | None = None,
    adapters: bool = True,
    adapter_steps: int = 24,
    seed: int = 0,
) -> dict[str, Any]:
    from serving.compensator import CompensationConfig
    from serving.encoder import Encoder
    from serving.memory import make_memory
    from serving.predictor import Predictor
    from streams.redis_store import MemoryEntry

    if entries < base_texts:
        raise ValueError("entries must be at least base_texts")
    encoder = Encoder(model_path)
    if runtime == "onnx":
        from serving.onnx_encoder import OnnxEncoder

        model: Any = OnnxEncoder(
            model_path, cache_dir=out / "onnx-cache", intra_op_threads=1
        )  # as a replica runs it
    elif runtime == "torch":
        model = encoder
    else:
        raise ValueError(f"unknown runtime {runtime!r}: onnx or torch")
    per_domain = (base_texts + queries) // domains + 1
    texts = corpus(domains, per_domain, seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(texts))
    stored = [texts[i] for i in order[:base_texts]]
    fresh = [texts[i][0] for i in order[base_texts : base_texts + queries]]
    t = time.perf_counter()
    stored_keys = np.concatenate(
        [model.encode([s[0] for s in stored[i : i + 64]]) for i in range(0, len(stored), 64)]
    )
    encode_s = time.perf_counter() - t
    copies = -(-entries // base_texts)
    keys = _noisy(stored_keys, copies, rng)[:entries]
    src = np.repeat(np.arange(base_texts), copies)[:entries]
    mixed = rng.permutation(entries)
    memory_entries = [
        MemoryEntry(f"e{j}", stored[src[j]][1], stored[src[j]][2], keys[j], float(j), "bench")
        for j in mixed.tolist()
    ]
    # requests: three fresh texts to one stored one; batches cut from them in order
    requests = [fresh[i] if i % 4 else stored[int(rng.integers(base_texts))][0] for i in range(len(fresh))]
    known = _KnownKeys(encoder.dim, encoder.fingerprint)
    for i in range(0, len(requests), 64):
        chunk = requests[i : i + 64]
        known.keys.update(zip(chunk, model.encode(chunk), strict=True))

    tokens = [len(ids) for ids in encoder.token_ids(requests)]
    result: dict[str, Any] = {
        "entries": entries,
        "tokens_per_request": {"mean": float(np.mean(tokens)), "max": int(max(tokens))},
        "domains": domains,
        "base_texts": base_texts,
        "requests": len(requests),
        "runtime": runtime,
        "model": Path(model_path).name if model_path else "all-MiniLM-L6-v2 (bundled)",
        "threads": {"model_intra_op": 1 if runtime == "onnx" else None},
        "seconds_per_cell": seconds,
        "target_pct": TARGET_PCT,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "encode_base_s": encode_s,
        "kinds": {},
    }
    trained = _train_adapters(encoder, stored, out, adapter_steps, seed) if adapters else []
    result["adapter_steps"] = adapter_steps if adapters else 0
    for kind in kinds:
        memory = make_memory(kind, encoder.dim)
        t = time.perf_counter()
        for i in range(0, entries, 5000):
            memory.add(memory_entries[i : i + 5000])
        memory.wait_indexed()  # measure the index path, not the exact scan that serves while it builds
        build_s = time.perf_counter() - t
        predictor = Predictor(_TimedEncoder(encoder), memory, CompensationConfig(), key_encoder=known)
        modes: dict[str, dict[str, Any]] = {}
        for mode in ("memory", "adapter") if trained else ("memory",):
            if mode == "adapter":
                for artifact in trained:
                    predictor.activate(artifact)
            modes[mode] = {}
            for b in batch_sizes:
                batches = [requests[i : i + b] for i in range(0, len(requests) - b + 1, b)]
                modes[mode][str(b)] = measure(predictor, model, batches, seconds)
        result["kinds"][kind] = {"build_s": build_s, "entries_held": len(memory), "modes": modes}
        del predictor, memory
    result["worst_overhead_pct"] = {
        kind: {mode: max(c["overhead_pct"] for c in cells.values()) for mode, cells in r["modes"].items()}
        for kind, r in result["kinds"].items()
    }
    write_outputs(out, result)
    return result


def _train_adapters(
    encoder: Any, stored: list[tuple[str, str, str]], out: Path, steps: int, seed: int
) -> list[Any]:
    """One LoRA adapter + head per domain, from 64 of its stored texts, published and loaded as serving
    loads a promoted version."""
    from learners import artifacts
    from learners.trainer import TrainConfig, train_adapter
    from serving.artifacts import load_artifact
    from streams.schemas import ArtifactManifest

    loaded = []
    for domain in sorted({d for _, d, _ in stored}):
        rows = [(t, lab) for t, d, lab in stored if d == domain][:64]
        cfg = TrainConfig(epochs=1, batch_size=16, max_steps=steps, seed=seed)
        adapter = train_adapter(encoder, [t for t, _ in rows], [lab for _, lab in rows], cfg)
        manifest = ArtifactManifest(
            domain=domain,
            version=f"bench-{domain}",
            base_fingerprint=encoder.fingerprint,
            labels=adapter.labels,
            files={},
        )
        path = artifacts.publish(out / "artifacts", manifest, adapter.write)
        loaded.append(load_artifact(path, base_fingerprint=encoder.fingerprint, dim=encoder.dim))
    return loaded


def write_outputs(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2))
    lines = [
        "# driftserve bench overhead",
        "",
        f"compensation + retrieval as a share of the model's time, {result['entries']:,} memory entries "
        f"over {result['domains']} domains, runtime {result['runtime']}, target <= "
        f"{result['target_pct']:.0f}%; requests of {result['tokens_per_request']['mean']:.0f} tokens on "
        "average (short texts: the smallest model time, so the largest share)",
        "",
        "| index | domains served by | batch | model p50 ms | rest p50 ms | rest p99 ms | routing p50 ms "
        "| overhead | compensated | rounds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, r in result["kinds"].items():
        for mode, cells in r["modes"].items():
            for b, c in cells.items():
                lines.append(
                    f"| {kind} | {mode} | {b} | {c['model_p50_ms']:.2f} | {c['rest_p50_ms']:.3f} | "
                    f"{c['rest_p99_ms']:.3f} | {c['route_p50_ms']:.3f} | {c['overhead_pct']:.1f}% | "
                    f"{c['compensated_share']:.2f} | {c['rounds']} |"
                )
    lines += ["", f"worst overhead over the batch sizes (target <= {result['target_pct']:.0f}%):"]
    for kind, worst in result["worst_overhead_pct"].items():
        lines.append("- " + kind + ": " + ", ".join(f"{mode} {pct:.1f}%" for mode, pct in worst.items()))
    (out / "overhead.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    series = [(k, m, cells) for k, r in result["kinds"].items() for m, cells in r["modes"].items()]
    sizes = list(series[0][2]) if series else []
    width = 0.8 / max(1, len(series))
    for n, (kind, mode, cells) in enumerate(series):
        pct = [cells[b]["overhead_pct"] for b in sizes]
        ax.bar(np.arange(len(sizes)) + n * width, pct, width, label=f"{kind}, {mode}")
    ax.axhline(result["target_pct"], color="red", linestyle="--", label="target")
    ax.set_xticks(np.arange(len(sizes)) + width * (len(series) - 1) / 2, [f"batch {b}" for b in sizes])
    ax.set_ylabel("overhead, % of model time")
    ax.set_title(f"{result['entries']:,} entries, {result['domains']} domains")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "overhead.png", dpi=120)
    plt.close(fig)
