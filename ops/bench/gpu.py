"""GPU benchmark (one prepared script for a lent H100/H200): serving and training efficiency, each
against the raw rate of the same model measured in the same run.

- raw forward: the bare transformer in bf16, batch 256 of 128-token inputs already on the GPU;
- serving: driftserve's ``Predictor.predict`` on 256 texts of ~128 tokens (tokenization, bf16 encoder,
  nearest-class-mean head, batched memory search over ``memory_entries`` entries and compensation);
- raw LoRA step: peft LoRA (r=8, q/v) + linear head, bf16 autocast, AdamW, batch 256 on GPU tensors;
- learner: ``learners.trainer.train_adapter`` on texts (its own tokenization and loop), batch 256;
- serving replicas: N processes predicting on the one GPU (Serve replicas with ``replica_num_gpus=1/N``),
  the CPU cores split between them; their summed rate. Tokenization is CPU work (~1,000 characters per
  text here), so one process cannot keep an H100 busy.

Usage: python -m ops.bench.gpu --model-path DIR --out DIR
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch


def _timed(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _texts(model_path: str, n: int, words: int, seed: int) -> list[str]:
    vocab = [w for w in (Path(model_path) / "vocab.txt").read_text().split() if w.isalpha() and len(w) >= 4]
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(vocab, size=words)) for _ in range(n)]


def raw_forward(model_path: str, batch: int, seq: int, iters: int) -> float:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_path, dtype=torch.bfloat16).cuda().eval()
    ids = torch.randint(1000, 20000, (batch, seq), device="cuda")
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def step():
        model(input_ids=ids, attention_mask=mask)

    return batch / _timed(step, iters)


def _predictor(model_path: str, batch: int, memory_entries: int, device: str = "cuda"):
    """A replica's predictor on the GPU: bf16 encoder, ``memory_entries`` stored errors in one domain."""
    from serving.compensator import CompensationConfig
    from serving.encoder import Encoder
    from serving.memory import InProcessMemory
    from serving.predictor import Predictor
    from streams.redis_store import MemoryEntry

    encoder = Encoder(model_path, device=device, max_length=128, batch_size=batch)
    memory = InProcessMemory(encoder.dim, device=device if device != "cpu" else None)
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(memory_entries, encoder.dim)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    entries = [MemoryEntry(f"e{i}", "d", f"l{i % 10}", keys[i], 0.0, "v") for i in range(memory_entries)]
    memory.add(entries)
    return Predictor(encoder, memory, CompensationConfig()), encoder, memory, keys, entries


def _replica(model_path, batch, memory_entries, seconds, threads, barrier, out, device="cuda") -> None:
    """One serving replica process sharing the GPU (as Serve places replicas with fractional GPUs):
    predicts fresh batches of texts for ``seconds`` after every replica is ready."""
    torch.set_num_threads(threads)
    predictor, *_ = _predictor(model_path, batch, memory_entries, device)
    texts = _texts(model_path, batch * 16, words=140, seed=11)
    batches = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    domains = ["d"] * batch
    for b in batches[:3]:
        predictor.predict(b, domains)
    barrier.wait()
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        predictor.predict(batches[done % len(batches)], domains)
        done += 1
    out.put((done * batch, time.perf_counter() - start))


def serving_replicas(
    model_path: str, batch: int, memory_entries: int, replicas: int, seconds: float, device: str = "cuda"
) -> dict:
    """Aggregate predictions/s of ``replicas`` processes on one GPU, the CPU cores split between them
    (tokenization is CPU work: one process cannot keep the GPU busy)."""
    import multiprocessing as mp
    import os

    cores = len(os.sched_getaffinity(0))
    threads = max(1, cores // replicas)
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(replicas), ctx.Queue()
    env = {
        "RAYON_NUM_THREADS": str(threads),
        "OMP_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the spawned replicas only
    try:
        procs = [
            ctx.Process(
                target=_replica,
                args=(model_path, batch, memory_entries, seconds, threads, barrier, out, device),
            )
            for _ in range(replicas)
        ]
        for p in procs:
            p.start()
        results = [out.get(timeout=600) for _ in procs]
        for p in procs:
            p.join()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {
        "replicas": replicas,
        "threads_per_replica": threads,
        "seq_per_s": sum(n / t for n, t in results),
        "per_replica_seq_per_s": [n / t for n, t in results],
    }


def serving(model_path: str, batch: int, iters: int, memory_entries: int) -> dict:
    predictor, encoder, memory, keys, entries = _predictor(model_path, batch, memory_entries)
    from serving.memory import InProcessMemory

    cpu_memory = InProcessMemory(encoder.dim)
    cpu_memory.add(entries)
    queries = keys[:64] + 0.01
    gpu_sims, gpu_labels = memory.search_batch("d", queries, 32)
    cpu_sims, cpu_labels = cpu_memory.search_batch("d", queries, 32)
    search_max_diff = float(np.abs(gpu_sims - cpu_sims).max())
    texts = _texts(model_path, batch, words=140, seed=1)  # truncated to 128 tokens, like the raw rate
    tokens = encoder.tokenize(texts)["input_ids"].shape[1]

    def step():
        predictor.predict(texts, ["d"] * batch)

    per_batch = _timed(step, iters)
    # Two request batches in flight, as the Serve deployment runs them (max_concurrent_batches=2):
    # one tokenizes and searches memory on the CPU while the other runs on the GPU.
    import threading

    def two_streams() -> None:
        workers = [threading.Thread(target=lambda: [step() for _ in range(5)]) for _ in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    pipelined = _timed(two_streams, 2, warmup=1) / 10
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    _timed(step, 5, warmup=0)
    prof.disable()
    report = io.StringIO()
    pstats.Stats(prof, stream=report).sort_stats("cumulative").print_stats(35)
    tok = _timed(lambda: encoder.tokenize(texts), iters)
    return {
        "seq_per_s": batch / per_batch,
        "seq_per_s_two_batches_in_flight": batch / pipelined,
        "batch_ms": per_batch * 1000,
        "tokenize_ms": tok * 1000,
        "encode_ms": _timed(lambda: encoder.encode(texts), iters) * 1000,
        "tokens": int(tokens),
        "profile": report.getvalue(),
        "memory_entries": memory_entries,
        "gpu_vs_cpu_search_max_diff": search_max_diff,
        "gpu_vs_cpu_top1_agreement": float(
            np.mean([g[0] == c[0] for g, c in zip(gpu_labels, cpu_labels, strict=True)])
        ),
    }


def raw_lora_step(model_path: str, batch: int, seq: int, iters: int) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = get_peft_model(
        AutoModel.from_pretrained(model_path, dtype=torch.float32).cuda(),
        LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]),
    )
    head = torch.nn.Linear(model.config.hidden_size, 10).cuda()
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-4
    )
    ids = torch.randint(1000, 20000, (batch, seq), device="cuda")
    mask = torch.ones_like(ids)
    y = torch.randint(0, 10, (batch,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state.mean(1)
        loss = torch.nn.functional.cross_entropy(head(out.float()), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / _timed(step, iters)


def learner(model_path: str, batch: int, steps: int) -> dict:
    from learners.trainer import TrainConfig, train_adapter
    from serving.encoder import Encoder

    encoder = Encoder(model_path, device="cuda", max_length=128, batch_size=batch)
    texts = _texts(model_path, batch * steps, words=140, seed=2)
    labels = [f"l{i % 10}" for i in range(len(texts))]
    cfg = TrainConfig(epochs=1, batch_size=batch, max_steps=steps)
    train_adapter(
        encoder, texts[: batch * 2], labels[: batch * 2], TrainConfig(epochs=1, batch_size=batch)
    )  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    trained = train_adapter(encoder, texts, labels, cfg)
    torch.cuda.synchronize()
    took = time.perf_counter() - start
    return {"samples_per_s": trained.steps * batch / took, "steps": trained.steps, "seconds": took}


LEARNER_STEPS = 300  # one run as long as the learner's default (learner_max_steps): setup amortised alike


def main() -> None:

    parser = argparse.ArgumentParser()
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--memory-entries", type=int, default=100_000)
    parser.add_argument(
        "--replicas", type=int, nargs="*", default=[8, 16], help="replica processes sharing the GPU"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    result["raw_forward_seq_per_s"] = raw_forward(args.model_path, 256, 128, iters=50)
    result["serving"] = serving(args.model_path, 256, iters=20, memory_entries=args.memory_entries)
    result["serving_over_raw"] = result["serving"]["seq_per_s"] / result["raw_forward_seq_per_s"]
    result["serving_two_in_flight_over_raw"] = (
        result["serving"]["seq_per_s_two_batches_in_flight"] / result["raw_forward_seq_per_s"]
    )
    profile = result["serving"].pop("profile")
    (out / "gpu-serving-profile.txt").write_text(profile)
    result["serving_replicas"] = [
        serving_replicas(args.model_path, 256, args.memory_entries, n, seconds=10.0) for n in args.replicas
    ]
    best = max(result["serving_replicas"], key=lambda r: r["seq_per_s"])
    result["serving_replicas_best_over_raw"] = best["seq_per_s"] / result["raw_forward_seq_per_s"]
    (out / "gpu.json").write_text(json.dumps(result, indent=2))  # a partial result survives a later failure
    result["raw_lora_samples_per_s"] = raw_lora_step(args.model_path, 256, 128, iters=30)
    result["learner"] = learner(args.model_path, 256, steps=LEARNER_STEPS)
    result["learner_over_raw"] = result["learner"]["samples_per_s"] / result["raw_lora_samples_per_s"]
    (out / "gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
