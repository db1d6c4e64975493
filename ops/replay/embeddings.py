"""Encode every stream text once with the serving base encoder, for all baselines and probes.

Encoding is the slow part on a small CPU (50-200 texts/s), so the matrix is cached on disk under a key
of the model fingerprint, the token limit and the texts: a rerun of the same stream skips it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np


class TextEncoder(Protocol):
    fingerprint: str
    max_length: int
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def cache_key(encoder: TextEncoder, texts: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{encoder.fingerprint}|{encoder.max_length}|{len(texts)}".encode())
    for text in texts:
        digest.update(text.encode("utf-8", "replace"))
        digest.update(b"\0")
    return digest.hexdigest()[:24]


def embed_texts(
    encoder: TextEncoder,
    texts: Sequence[str],
    cache_dir: Path | None = None,
    *,
    chunk: int = 256,
    progress: bool = True,
) -> np.ndarray:
    """(n, dim) float32 unit-norm rows, in the order of ``texts``."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"embeddings-{cache_key(encoder, texts)}.npy"
        if path.exists():
            cached = np.load(path)
            if cached.shape == (len(texts), encoder.dim):
                return cached
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(texts), desc="encode", unit="text", dynamic_ncols=True, mininterval=0.5)
    parts = []
    for start in range(0, len(texts), chunk):
        batch = list(texts[start : start + chunk])
        parts.append(encoder.encode(batch))
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    out = np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, encoder.dim), np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, out)
        tmp.replace(path)
    return out
