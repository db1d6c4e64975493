"""Publishing and loading: only complete, hash-verified, finite, shape-consistent safetensors load."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from learners import artifacts
from learners.trainer import TrainConfig, train_adapter
from serving.artifacts import HEAD_FILE, MANIFEST, load_artifact, sha256_file
from serving.errors import ArtifactRejected
from streams.schemas import ArtifactManifest

TEXTS = ["good thing", "bad thing", "great stuff", "awful stuff"] * 2
LABELS = ["pos", "neg", "pos", "neg"] * 2


@pytest.fixture(scope="module")
def trained(tiny_encoder):
    return train_adapter(tiny_encoder, TEXTS, LABELS, TrainConfig(epochs=1, batch_size=4))


def _publish(root: Path, encoder, trained, version: str = "v1") -> Path:
    manifest = ArtifactManifest(
        domain="d", version=version, base_fingerprint=encoder.fingerprint, labels=trained.labels, files={}
    )
    return artifacts.publish(root, manifest, trained.write)


def _rehash(path: Path, rel: str) -> None:
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][rel] = sha256_file(path / rel)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_roundtrip(tmp_path, tiny_encoder, trained):
    path = _publish(tmp_path, tiny_encoder, trained)
    art = load_artifact(path, base_fingerprint=tiny_encoder.fingerprint, dim=tiny_encoder.dim)
    assert art.head.labels == ["neg", "pos"]
    assert set(art.manifest.files) == {
        HEAD_FILE,
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    }
    assert not any(p.name.startswith(artifacts.TMP_PREFIX) for p in path.parent.iterdir())


def test_versions_are_immutable(tmp_path, tiny_encoder, trained):
    _publish(tmp_path, tiny_encoder, trained)
    with pytest.raises(FileExistsError):
        _publish(tmp_path, tiny_encoder, trained)


def test_hash_mismatch_rejected(tmp_path, tiny_encoder, trained):
    path = _publish(tmp_path, tiny_encoder, trained)
    with (path / HEAD_FILE).open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x00\x00\x00")
    with pytest.raises(ArtifactRejected) as info:
        load_artifact(path, base_fingerprint=tiny_encoder.fingerprint, dim=tiny_encoder.dim)
    assert info.value.reason == "hash_mismatch"


def test_pickle_file_rejected_even_if_listed(tmp_path, tiny_encoder, trained):
    path = _publish(tmp_path, tiny_encoder, trained)
    (path / "adapter" / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    _rehash(path, "adapter/adapter_model.bin")
    with pytest.raises(ArtifactRejected) as info:
        load_artifact(path, base_fingerprint=tiny_encoder.fingerprint, dim=tiny_encoder.dim)
    assert info.value.reason == "forbidden_file"


def test_unlisted_file_rejected(tmp_path, tiny_encoder, trained):
    path = _publish(tmp_path, tiny_encoder, trained)
    (path / "extra.json").write_text("{}")
    with pytest.raises(ArtifactRejected) as info:
        load_artifact(path, base_fingerprint=tiny_encoder.fingerprint, dim=tiny_encoder.dim)
    assert info.value.reason == "unlisted_file"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t: {**t, "weight": t["weight"] * float("nan")}, "non_finite"),
        (lambda t: {**t, "weight": torch.zeros(5, t["weight"].shape[1])}, "shape_mismatch"),
    ],
)
def test_bad_head_rejected(tmp_path, tiny_encoder, trained, mutate, reason):
    path = _publish(tmp_path, tiny_encoder, trained)
    save_file(mutate(load_file(str(path / HEAD_FILE))), str(path / HEAD_FILE))
    _rehash(path, HEAD_FILE)
    with pytest.raises(ArtifactRejected) as info:
        load_artifact(path, base_fingerprint=tiny_encoder.fingerprint, dim=tiny_encoder.dim)
    assert info.value.reason == reason


def test_other_base_model_rejected(tmp_path, tiny_encoder, trained):
    path = _publish(tmp_path, tiny_encoder, trained)
    with pytest.raises(ArtifactRejected) as info:
        load_artifact(path, base_fingerprint="0" * 64, dim=tiny_encoder.dim)
    assert info.value.reason == "base_mismatch"


def test_crash_before_commit_leaves_nothing_loadable(tmp_path, tiny_encoder, trained):
    manifest = ArtifactManifest(
        domain="d", version="v9", base_fingerprint=tiny_encoder.fingerprint, labels=trained.labels, files={}
    )

    def crash(directory: Path) -> None:
        trained.write(directory)
        raise KeyboardInterrupt  # e.g. SIGINT in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        artifacts.publish(tmp_path, manifest, crash)
    assert not (tmp_path / "d" / "v9").exists()
    assert list((tmp_path / "d").iterdir()) == []


def test_staged_candidate_is_not_at_a_version_path(tmp_path, tiny_encoder, trained):
    manifest = ArtifactManifest(
        domain="d", version="v5", base_fingerprint=tiny_encoder.fingerprint, labels=trained.labels, files={}
    )
    staged = artifacts.stage(tmp_path, manifest, trained.write)
    assert staged.name.startswith(artifacts.TMP_PREFIX) and not (tmp_path / "d" / "v5").exists()
    load_artifact(staged, base_fingerprint=tiny_encoder.fingerprint, dim=tiny_encoder.dim)
    final = artifacts.commit(staged, metrics={"holdout_accuracy": 1.0})
    art = load_artifact(final, base_fingerprint=tiny_encoder.fingerprint, dim=tiny_encoder.dim)
    assert art.manifest.metrics == {"holdout_accuracy": 1.0}
