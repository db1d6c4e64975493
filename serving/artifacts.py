"""Loading published adapter artifacts, verified before anything reaches the model.

An artifact is a directory: ``manifest.json`` (streams.schemas.ArtifactManifest), ``head.safetensors``
and ``adapter/{adapter_config.json, adapter_model.safetensors}``. Only safetensors are ever loaded; a file
whose sha256 differs from the manifest, a file the manifest does not list, a pickle-capable format,
non-finite weights, a head whose shape does not match its labels, or another base model's artifact is
rejected with :class:`ArtifactRejected` and never loaded.

A *guarded* artifact (a compatible prediction update, ``serving.guard``) also carries its parent's own
adapter and head under ``guard/``, with the parent's manifest: a complete artifact of its own, verified the
same way, hashed in the outer manifest too. A guard never carries a guard (one level, bounded cost).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file

from serving.errors import ArtifactRejected
from streams.schemas import ArtifactManifest

MANIFEST = "manifest.json"
HEAD_FILE = "head.safetensors"
ADAPTER_DIR = "adapter"
GUARD_DIR = "guard"
_ALLOWED_SUFFIXES = {".safetensors", ".json"}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Head:
    """Linear classification head over pooled embeddings, with its own label list."""

    labels: list[str]
    weight: np.ndarray  # (C, d) float32
    bias: np.ndarray  # (C,) float32

    def probs(self, emb: np.ndarray) -> np.ndarray:
        logits = emb @ self.weight.T + self.bias
        logits = logits - logits.max(axis=-1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: ArtifactManifest
    head: Head
    guard: Artifact | None = None  # the parent whose answers this one keeps unless it is sure (serving.guard)

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ArtifactRejected("non_finite", f"{where}:{name} has NaN or inf")


def load_artifact(path: str | Path, *, base_fingerprint: str, dim: int, _nested: bool = False) -> Artifact:
    """Verify everything, then return the head; the LoRA weights are loaded by the encoder afterwards."""
    root = Path(path)
    try:
        manifest = ArtifactManifest.model_validate(json.loads((root / MANIFEST).read_text()))
    except FileNotFoundError as exc:
        raise ArtifactRejected("no_manifest", str(root)) from exc
    except (json.JSONDecodeError, ValidationError) as exc:
        raise ArtifactRejected("bad_manifest", str(exc)[:300]) from exc
    if manifest.base_fingerprint != base_fingerprint:
        raise ArtifactRejected(
            "base_mismatch",
            f"artifact built on {manifest.base_fingerprint[:12]}, serving {base_fingerprint[:12]}",
        )
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {MANIFEST}
    for rel in sorted(present):
        if Path(rel).suffix not in _ALLOWED_SUFFIXES:
            raise ArtifactRejected("forbidden_file", f"{rel}: only safetensors and json are loaded")
    unlisted = present - set(manifest.files)
    if unlisted:
        raise ArtifactRejected("unlisted_file", ", ".join(sorted(unlisted)))
    for rel, expected in manifest.files.items():
        file = root / rel
        if not file.is_file():
            raise ArtifactRejected("missing_file", rel)
        if sha256_file(file) != expected:
            raise ArtifactRejected("hash_mismatch", rel)
    try:
        head_t = load_file(str(root / HEAD_FILE))
        lora_t = load_file(str(root / ADAPTER_DIR / "adapter_model.safetensors"))
    except (SafetensorError, FileNotFoundError, OSError) as exc:
        raise ArtifactRejected("unreadable_weights", str(exc)[:300]) from exc
    _check_finite(head_t, HEAD_FILE)
    _check_finite(lora_t, "adapter")
    weight, bias = head_t.get("weight"), head_t.get("bias")
    n = len(manifest.labels)
    if weight is None or bias is None or tuple(weight.shape) != (n, dim) or tuple(bias.shape) != (n,):
        shape = None if weight is None else tuple(weight.shape)
        raise ArtifactRejected("shape_mismatch", f"head {shape} for {n} labels, dim {dim}")
    if len(set(manifest.labels)) != n:
        raise ArtifactRejected("bad_manifest", "duplicate labels")
    head = Head(
        labels=list(manifest.labels),
        weight=weight.float().numpy().astype(np.float32),
        bias=bias.float().numpy().astype(np.float32),
    )
    guard = None
    if (root / GUARD_DIR / MANIFEST).is_file():
        if _nested:
            raise ArtifactRejected("nested_guard", f"{root}: a guard must not carry a guard")
        guard = load_artifact(root / GUARD_DIR, base_fingerprint=base_fingerprint, dim=dim, _nested=True)
    return Artifact(path=root, manifest=manifest, head=head, guard=guard)
