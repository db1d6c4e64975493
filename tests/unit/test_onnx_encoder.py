"""The ONNX Runtime encoder on the tiny random BERT: same embeddings as torch, atomic and verified cache."""

from __future__ import annotations

import json

import numpy as np
import pytest

from serving.onnx_encoder import DEFAULT_TOLERANCE, OnnxEncoder, OnnxVerificationError, select_providers

TEXTS = ["hello world", "a much longer sentence that needs padding in the batch", "", "refund " * 60]


def _encoder(model_dir: str, cache, **kwargs) -> OnnxEncoder:
    return OnnxEncoder(model_dir, max_length=32, cache_dir=cache, **kwargs)


def _cache_files(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir())


def test_export_matches_the_torch_encoder(tiny_model_dir, tiny_encoder, tmp_path, capfd):
    enc = _encoder(tiny_model_dir, tmp_path)
    assert enc.providers == ["CPUExecutionProvider"]
    assert enc.fingerprint == tiny_encoder.fingerprint and enc.dim == tiny_encoder.dim == 32
    assert enc.max_length == 32 and enc.max_abs_diff <= DEFAULT_TOLERANCE
    got = enc.encode(TEXTS)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 32)
    np.testing.assert_allclose(got, tiny_encoder.encode(TEXTS), atol=DEFAULT_TOLERANCE)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(enc.encode(TEXTS[:1]), got[:1], atol=1e-6)  # batch composition is irrelevant
    assert enc.encode([]).shape == (0, 32)
    feeds = enc.tokenize(TEXTS)
    assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
    assert feeds["input_ids"].shape[1] == 32  # truncated at max_length
    # Only the content-addressed model and its manifest remain; no partial file, no ORT error output.
    assert _cache_files(tmp_path) == sorted([enc.onnx_path.name, f"{enc.fingerprint}.json"])
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "[E:" not in err


def test_a_second_load_uses_the_verified_cache(tiny_model_dir, tmp_path, monkeypatch):
    first = _encoder(tiny_model_dir, tmp_path)

    def no_export(self, path):
        raise AssertionError("must load from the cache, not export again")

    monkeypatch.setattr(OnnxEncoder, "_export_to", no_export)
    second = _encoder(tiny_model_dir, tmp_path)
    assert second.onnx_path == first.onnx_path
    np.testing.assert_allclose(second.encode(TEXTS), first.encode(TEXTS), atol=1e-6)


def test_a_stray_partial_file_is_ignored(tiny_model_dir, tiny_encoder, tmp_path):
    from serving.encoder import model_fingerprint

    fp = model_fingerprint(tiny_model_dir)
    stray = tmp_path / f".{fp[:16]}.4242.deadbeef.onnx.partial"
    stray.write_bytes(b"\x08\x07half-written protobuf")  # a crash mid-export
    enc = _encoder(tiny_model_dir, tmp_path)
    assert enc.onnx_path != stray and enc.onnx_path.suffix == ".onnx"
    assert stray.exists()  # another process may still be writing it: left alone
    np.testing.assert_allclose(enc.encode(TEXTS), tiny_encoder.encode(TEXTS), atol=DEFAULT_TOLERANCE)


def test_a_corrupted_cached_file_is_detected_by_hash_and_re_exported(
    tiny_model_dir, tiny_encoder, tmp_path, caplog
):
    first = _encoder(tiny_model_dir, tmp_path)
    data = first.onnx_path.read_bytes()
    first.onnx_path.write_bytes(data[: len(data) // 2])  # truncated on disk
    with caplog.at_level("WARNING", logger="serving.onnx_encoder"):
        again = _encoder(tiny_model_dir, tmp_path)
    assert "sha256 mismatch" in caplog.text
    manifest = json.loads((tmp_path / f"{again.fingerprint}.json").read_text())
    assert again.onnx_path.name == manifest["file"] and again.onnx_path.stat().st_size == len(data)
    np.testing.assert_allclose(again.encode(TEXTS), tiny_encoder.encode(TEXTS), atol=DEFAULT_TOLERANCE)


def test_a_cached_model_that_computes_something_else_fails_verification_and_is_re_exported(
    tiny_model_dir, tiny_encoder, tmp_path, caplog
):
    import onnx
    from onnx import numpy_helper

    from serving.artifacts import sha256_file as _sha256

    first = _encoder(tiny_model_dir, tmp_path)
    model = onnx.load(str(first.onnx_path))
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    tampered = numpy_helper.to_array(biggest) * 1.5
    biggest.CopyFrom(numpy_helper.from_array(tampered.astype(np.float32), biggest.name))
    onnx.save(model, str(first.onnx_path))
    manifest_path = tmp_path / f"{first.fingerprint}.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["sha256"] = _sha256(first.onnx_path)  # a consistent manifest: only verification can tell
    manifest_path.write_text(json.dumps(manifest))

    with caplog.at_level("WARNING", logger="serving.onnx_encoder"):
        again = _encoder(tiny_model_dir, tmp_path)
    assert "differs from torch" in caplog.text
    assert again.max_abs_diff <= DEFAULT_TOLERANCE
    np.testing.assert_allclose(again.encode(TEXTS), tiny_encoder.encode(TEXTS), atol=DEFAULT_TOLERANCE)


def test_an_export_that_fails_verification_is_refused_and_not_cached(tiny_model_dir, tmp_path, monkeypatch):
    real = OnnxEncoder.reference_embeddings

    def shifted(self):
        return real(self) + 0.01

    monkeypatch.setattr(OnnxEncoder, "reference_embeddings", shifted)
    with pytest.raises(OnnxVerificationError) as info:
        _encoder(tiny_model_dir, tmp_path)
    assert info.value.max_abs_diff > DEFAULT_TOLERANCE and "refusing" in str(info.value)
    assert _cache_files(tmp_path) == []


def test_the_cuda_provider_needs_onnxruntime_torch_and_its_libraries(monkeypatch, caplog):
    import onnxruntime as ort
    import torch

    from serving import onnx_encoder

    assert select_providers() == ["CPUExecutionProvider"]  # this machine: torch sees no GPU
    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_providers() == ["CPUExecutionProvider"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(onnx_encoder, "_cuda_provider_problem", lambda: "libcublasLt.so.13: not found")
    with caplog.at_level("WARNING", logger="serving.onnx_encoder"):
        assert select_providers() == ["CPUExecutionProvider"]
    assert "libcublasLt" in caplog.text
    monkeypatch.setattr(onnx_encoder, "_cuda_provider_problem", lambda: None)
    assert select_providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert select_providers() == ["CPUExecutionProvider"]


def test_constructor_checks_its_arguments(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="tolerance"):
        _encoder(tiny_model_dir, tmp_path, tolerance=-1.0)
    with pytest.raises(ValueError, match="max_length"):
        OnnxEncoder(tiny_model_dir, max_length=1, cache_dir=tmp_path)


@pytest.mark.parametrize("first", ["usearch.index", "onnxruntime"])
def test_the_ann_library_and_onnxruntime_load_together_in_either_order(first):
    """usearch 2.26 is built with pybind11 internals v12, onnxruntime 1.31 and torch with v11: importing
    onnxruntime after such a usearch segfaults the process. The pin keeps them on one ABI."""
    import subprocess
    import sys

    second = "onnxruntime" if first == "usearch.index" else "usearch.index"
    proc = subprocess.run(
        [sys.executable, "-c", f"import {first}; import {second}"], capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
