"""Device check (docs/gpu.md, run f): the learner with its loader thread tokenizing in Rust, without the
GIL (``release_gil``, the default on a GPU since this check) against the serving word cache (Python,
holding the GIL), alternated twice in one process, between two raw LoRA steps.

Usage: python scripts/gpu_learner_ab.py MODEL_DIR
"""

import json
import sys

import serving.encoder as E
from ops.bench import gpu

mp = sys.argv[1]
orig = E.Encoder.token_ids


def word_cache(self, texts, release_gil=False):
    return orig(self, texts)


res = {"raw_before": gpu.raw_lora_step(mp, 256, 128, 30)}
for label in ["rust", "words", "rust", "words"]:
    E.Encoder.token_ids = orig if label == "rust" else word_cache
    r = gpu.learner(mp, 256, 300)
    res.setdefault(label, []).append(r["samples_per_s"])
    print(label, r, flush=True)
res["raw_after"] = gpu.raw_lora_step(mp, 256, 128, 30)
print(json.dumps(res))
