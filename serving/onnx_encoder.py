"""The base (adapter-free) embedding on ONNX Runtime, verified against torch before it serves.

``OnnxEncoder.encode`` returns what ``Encoder.encode`` returns without an adapter (same tokenizer, same
``max_length`` truncation, mean pooling and L2 norm, both inside the exported graph): the error-memory
key and the prototype head's input. LoRA adapters stay on the torch path.

Export: ``torch.onnx.export`` (the TorchScript exporter, which needs no extra package; the dynamo
exporter needs ``onnxscript``) with dynamic batch and sequence axes, traced on a *padded* batch so the
attention-mask path is in the graph. The file lands in a cache folder keyed by the model fingerprint,
atomically: written to a ``.partial`` temp file, verified, renamed to a content-addressed name
(``<fingerprint>-<sha256>.onnx``), and only then named by the manifest ``<fingerprint>.json``, itself
replaced atomically. A crash leaves at worst an unreferenced temp file, which is never loaded.

Verification, at export and at every load: the session's embeddings of ``VERIFY_TEXTS`` (one padded batch
and each text alone) against a float32 torch forward on the CPU; the largest absolute difference over
the unit-norm embeddings must be at most ``tolerance`` (default 1e-4; fp32 CPU differs by ~1e-7). A
cached file whose sha256 does not match its manifest, or which fails verification, is re-exported; a
fresh export that fails raises ``OnnxVerificationError`` and is never used.

Providers: CUDA only when ONNX Runtime offers it *and* torch sees a GPU *and* the provider library loads
(checked quietly first: onnxruntime-gpu 1.31 needs the CUDA 13 / cuDNN 9 libraries), otherwise CPU
alone, so a GPU wheel on a CPU machine, or beside another CUDA, logs no provider-load errors; one warning
says when a GPU is present but unused. TF32 is disabled on CUDA so that fp32 stays within the tolerance.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from serving.artifacts import sha256_file
from serving.encoder import model_fingerprint, resolve_model_path
from serving.errors import ServingError
from serving.tokenization import FastTokenizer

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
OPSET = 17
_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
VERIFY_TEXTS = (
    "The battery died after two days.",
    "ok",
    "",
    "Ünïcödé, emoji 🙂 and punctuation?! (all in one) — fine.",
    "refund please " * 80,  # longer than max_length: truncated
    "The quick brown fox jumps over the lazy dog near the riverbank at dawn.",
)


class OnnxVerificationError(ServingError):
    """The exported graph's embeddings differ from torch's by more than the tolerance; it is not used."""

    error_type = "onnx_verification_failed"

    def __init__(self, max_abs_diff: float, tolerance: float, path: str) -> None:
        super().__init__(
            f"ONNX export of {path} differs from torch by {max_abs_diff:.3g} (tolerance {tolerance:.3g}); "
            "refusing to serve it: use the torch runtime or raise the tolerance knowingly"
        )
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "driftserve" / "onnx"


def select_providers() -> list[str]:
    """CUDA only when ONNX Runtime offers it, torch sees a GPU and the provider's libraries load; CPU
    always last."""
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
        problem = _cuda_provider_problem()
        if problem is None:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        log.warning(
            "ONNX Runtime's CUDA provider cannot load (%s); the ONNX encoder runs on the CPU", problem
        )
    return ["CPUExecutionProvider"]


def _cuda_provider_problem() -> str | None:
    """Load the CUDA provider library the way ONNX Runtime would, but quietly: a GPU wheel built for
    another CUDA/cuDNN than the machine's would otherwise log an error for every session it opens."""
    import ctypes

    import onnxruntime as ort

    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / "libonnxruntime_providers_shared.so"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / "libonnxruntime_providers_cuda.so"))
    except OSError as exc:
        return str(exc)
    return None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OnnxEncoder:
    """Adapter-free embeddings through ONNX Runtime; the same vectors as ``Encoder.encode(texts)``."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        max_length: int = 128,
        batch_size: int = 32,
        cache_dir: str | Path | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        if max_length < 2 or batch_size < 1:
            raise ValueError("max_length must be >= 2 and batch_size >= 1")
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}")
        self.model_path = resolve_model_path(model_path)
        self.max_length = max_length
        self.batch_size = batch_size
        self.tolerance = tolerance
        self.intra_op_threads = intra_op_threads
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._tok = FastTokenizer(self.tokenizer, max_length)
        self.fingerprint = model_fingerprint(self.model_path)
        self.dim = int(AutoConfig.from_pretrained(self.model_path).hidden_size)
        self.input_names = [n for n in _INPUTS if n in self.tokenizer.model_input_names]
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._requested = list(providers) if providers is not None else select_providers()
        self._reference: np.ndarray | None = None
        # Other processes may share the cache folder: files are only ever renamed into place, never
        # rewritten, so no lock is needed. An ORT session is safe to run from many threads.
        self.session, self.onnx_path, self.max_abs_diff = self._load_cached() or self._export()
        self.providers = self.session.get_providers()

    # -- encoding -------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        ids, mask = self._tok(texts)  # single texts: token type 0 throughout, as the tokenizer gives
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        return {name: feeds[name] for name in self.input_names}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return self._encode_with(self.session, texts)

    def _encode_with(self, session: Any, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            feeds = self.tokenize(texts[start : start + self.batch_size])
            chunks.append(session.run(["embedding"], feeds)[0])
        return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)

    # -- cache, export, verification ------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.cache_dir / f"{self.fingerprint}.json"

    def _load_cached(self) -> tuple[Any, Path, float] | None:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ONNX cache manifest %s unreadable (%s); re-exporting", self.manifest_path, exc)
            return None
        path = self.cache_dir / str(manifest.get("file", ""))
        if manifest.get("fingerprint") != self.fingerprint or manifest.get("opset") != OPSET:
            log.warning("ONNX cache manifest %s is for another model or opset; re-exporting", path)
            return None
        if not path.is_file() or sha256_file(path) != manifest.get("sha256"):
            log.warning("cached ONNX model %s is missing or corrupt (sha256 mismatch); re-exporting", path)
            return None
        try:
            session = self._session(path)
            diff = self._verify(session)
        except Exception as exc:  # a file ORT cannot load or run is as good as corrupt
            log.warning("cached ONNX model %s does not load (%s); re-exporting", path, exc)
            return None
        if diff > self.tolerance:
            log.warning("cached ONNX model %s differs from torch by %.3g; re-exporting", path, diff)
            return None
        log.info("ONNX encoder %s on %s (max abs diff vs torch %.2g)", path, session.get_providers(), diff)
        return session, path, diff

    def _export(self) -> tuple[Any, Path, float]:
        tmp = self.cache_dir / f".{self.fingerprint[:16]}.{os.getpid()}.{uuid.uuid4().hex}.onnx.partial"
        try:
            self._export_to(tmp)
            with tmp.open("rb") as fh:
                os.fsync(fh.fileno())
            session = self._session(tmp)
            diff = self._verify(session)
            if diff > self.tolerance:
                raise OnnxVerificationError(diff, self.tolerance, self.model_path)
            sha = sha256_file(tmp)
            final = self.cache_dir / f"{self.fingerprint[:16]}-{sha[:16]}.onnx"
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        manifest = {
            "fingerprint": self.fingerprint,
            "file": final.name,
            "sha256": sha,
            "opset": OPSET,
            "inputs": self.input_names,
            "dim": self.dim,
            "max_abs_diff": diff,
            "tolerance": self.tolerance,
        }
        fd, mtmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".manifest.", suffix=".partial")
        with os.fdopen(fd, "w") as fh:
            json.dump(manifest, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(mtmp, 0o644)  # mkstemp makes it private; other users' replicas may share the cache
        os.replace(mtmp, self.manifest_path)
        _fsync_dir(self.cache_dir)
        log.info("exported ONNX encoder %s (max abs diff vs torch %.2g)", final, diff)
        return session, final, diff

    def _torch_model(self, *, eager: bool) -> Any:
        """fp32 on the CPU; the exported copy uses eager attention (plain ops that trace), the reference
        the default implementation, as ``Encoder`` serves it."""
        import torch
        from transformers import AutoModel

        kwargs = {"attn_implementation": "eager"} if eager else {}
        return AutoModel.from_pretrained(self.model_path, dtype=torch.float32, **kwargs).eval()

    def _export_to(self, path: Path) -> None:
        import torch

        from serving.encoder import Encoder

        names = self.input_names

        class _Pooled(torch.nn.Module):
            def __init__(self, model: torch.nn.Module) -> None:
                super().__init__()
                self.model = model

            def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
                feeds = dict(zip(names, inputs, strict=True))
                hidden = self.model(**feeds).last_hidden_state
                return Encoder.pool(hidden, feeds["attention_mask"])

        # A padded example: the traced graph must keep the attention-mask path.
        example = self.tokenize(["a short one", "a longer example sentence so that the batch has padding"])
        args = tuple(torch.from_numpy(example[n]) for n in names)
        axes = {n: {0: "batch", 1: "sequence"} for n in names} | {"embedding": {0: "batch"}}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer and deprecation notices; verification is the check
            torch.onnx.export(
                _Pooled(self._torch_model(eager=True)),
                args,
                str(path),
                input_names=names,
                output_names=["embedding"],
                dynamic_axes=axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )

    def _session(self, path: Path) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # errors only: no per-node placement warnings
        # Idle worker threads must sleep, not spin: replicas, the memory writer and the learner share a
        # few cores, and spinning thread pools starve the process that has work.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        if self.intra_op_threads:
            opts.intra_op_num_threads = self.intra_op_threads
        providers: list[Any] = [
            (p, {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p for p in self._requested
        ]
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        if (
            "CUDAExecutionProvider" in self._requested
            and "CUDAExecutionProvider" not in session.get_providers()
        ):
            log.warning("ONNX Runtime could not load its CUDA provider; the ONNX encoder runs on the CPU")
        return session

    def reference_embeddings(self) -> np.ndarray:
        """torch fp32 (CPU) embeddings of ``VERIFY_TEXTS``, computed once per process."""
        if self._reference is None:
            import torch

            from serving.encoder import Encoder

            model = self._torch_model(eager=False)
            feeds = {k: torch.from_numpy(v) for k, v in self.tokenize(VERIFY_TEXTS).items()}
            with torch.inference_mode():
                out = model(**feeds).last_hidden_state
                self._reference = Encoder.pool(out, feeds["attention_mask"]).numpy().astype(np.float32)
        return self._reference

    def _verify(self, session: Any) -> float:
        ref = self.reference_embeddings()
        batched = self._encode_with(session, VERIFY_TEXTS)
        single = np.concatenate([self._encode_with(session, [t]) for t in VERIFY_TEXTS])
        if batched.shape != ref.shape or single.shape != ref.shape:
            return float("inf")
        diff = max(float(np.abs(batched - ref).max()), float(np.abs(single - ref).max()))
        return diff if np.isfinite(diff) else float("inf")
