"""Device check (docs/gpu.md, run g): where the learner's time goes on a GPU. Tokenization of a batch of
256 alone (Rust vs the word cache); the raw LoRA step in eval mode (the bench's) and in train mode with
the learner's LoRA dropout; three learner runs recording the time to the first batch and how long the
training loop waited on its loader thread (prefetch depth 3, 8, 3).

Usage: python scripts/gpu_learner_diag.py MODEL_DIR
"""

import json
import sys
import time
from dataclasses import replace

import torch

import learners.trainer as T
from ops.bench import gpu
from serving.encoder import Encoder

mp = sys.argv[1]
res = {}
enc = Encoder(mp, device="cuda", max_length=128, batch_size=256)
texts = gpu._texts(mp, 256 * 300, words=140, seed=2)
labels = [f"l{i % 10}" for i in range(len(texts))]
for k, rg in enumerate((True, False, True, False)):
    t = time.perf_counter()
    for i in range(20):
        enc.token_ids(texts[(k * 20 + i) * 256 : (k * 20 + i + 1) * 256], release_gil=rg)
    res.setdefault("tok_ms_" + ("rust" if rg else "words"), []).append((time.perf_counter() - t) / 20 * 1000)
print(res, flush=True)


def raw(train, dropout):
    return gpu.raw_lora_step(mp, 256, 128, 30, train=train, dropout=dropout)


stats = {}
orig = T._prefetched


def timed(source, depth=3):
    g = orig(source, stats.get("depth", depth))
    wait, n = 0.0, 0
    try:
        while True:
            t = time.perf_counter()
            try:
                item = next(g)
            except StopIteration:
                break
            wait += time.perf_counter() - t
            n += 1
            if n == 1:
                stats["first_batch_at_s"] = t - stats.get("start", t)
            yield item
    finally:
        stats["loader_wait_s"], stats["batches"] = wait, n
        g.close()


T._prefetched = timed

cfg = T.TrainConfig(epochs=1, batch_size=256, max_steps=300, lora_layers=None, max_length=None)
T.train_adapter(enc, texts[:512], labels[:512], replace(cfg, max_steps=2))
for name, train, drop in [("raw_eval", False, 0.0), ("raw_train_dropout", True, 0.05)]:
    res[name] = raw(train, drop)
for depth in (3, 8, 3):
    stats.clear()
    stats["depth"] = depth
    torch.cuda.synchronize()
    stats["start"] = t0 = time.perf_counter()
    tr = T.train_adapter(enc, texts, labels, cfg)
    torch.cuda.synchronize()
    took = time.perf_counter() - t0
    row = {
        "depth": depth,
        "samples_per_s": tr.steps * 256 / took,
        "seconds": took,
        **{k: v for k, v in stats.items() if k not in ("start", "depth")},
    }
    res.setdefault("learner", []).append(row)
    print(row, flush=True)
for name, train, drop in [("raw_eval", False, 0.0), ("raw_train_dropout", True, 0.05)]:
    res[name + "_after"] = raw(train, drop)
print(json.dumps(res))
