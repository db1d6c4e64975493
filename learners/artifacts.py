"""Atomic artifact publishing: build in a hidden temp directory, fsync, hash, then one rename.

A crash at any point leaves either nothing at the final path or a complete, hash-verified artifact;
temp directories are never pointed at and are swept on the next publish.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from serving.artifacts import ADAPTER_DIR, GUARD_DIR, HEAD_FILE, MANIFEST, Artifact, sha256_file
from streams.schemas import ArtifactManifest

TMP_PREFIX = ".tmp-"


def new_version() -> str:
    return time.strftime("v%Y%m%d-%H%M%S", time.gmtime()) + f"-{uuid.uuid4().hex[:6]}"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def sweep_temp(domain_dir: Path, older_than_s: float = 600.0) -> None:
    """Remove temp dirs left by crashed publishers (old enough that no publisher still owns them)."""
    if not domain_dir.is_dir():
        return
    now = time.time()
    for child in domain_dir.iterdir():
        if child.name.startswith(TMP_PREFIX) and now - child.stat().st_mtime > older_than_s:
            shutil.rmtree(child, ignore_errors=True)


def stage(
    artifacts_root: str | Path,
    manifest: ArtifactManifest,
    write_files: Callable[[Path], None],
) -> Path:
    """Write a complete, hashed artifact into a hidden temp dir that no pointer can name yet.

    ``write_files(tmpdir)`` writes the payload; the manifest's ``files`` is filled with their hashes.
    The staged dir is loadable by path, so candidates are evaluated with serving's own loader first.
    """
    domain_dir = Path(artifacts_root) / manifest.domain
    domain_dir.mkdir(parents=True, exist_ok=True)
    sweep_temp(domain_dir)
    if (domain_dir / manifest.version).exists():
        raise FileExistsError(f"artifact {manifest.domain}/{manifest.version} exists; versions are immutable")
    tmp = domain_dir / f"{TMP_PREFIX}{manifest.version}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_files(tmp)
        for junk in tmp.rglob("README.md"):  # peft writes a model card; only weights and configs ship
            junk.unlink()
        files = {p.relative_to(tmp).as_posix(): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MANIFEST).write_text(manifest.model_copy(update={"files": files}).model_dump_json(indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def commit(staged: Path, **manifest_updates: object) -> Path:
    """Record final manifest fields (e.g. metrics), fsync, and rename into place in one step."""
    manifest = ArtifactManifest.model_validate_json((staged / MANIFEST).read_text())
    if manifest_updates:
        manifest = manifest.model_copy(update=manifest_updates)
        (staged / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    final = staged.parent / manifest.version
    _fsync_tree(staged)
    os.rename(staged, final)
    dir_fd = os.open(staged.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def discard(staged: Path) -> None:
    shutil.rmtree(staged, ignore_errors=True)


def publish(
    artifacts_root: str | Path,
    manifest: ArtifactManifest,
    write_files: Callable[[Path], None],
) -> Path:
    """Stage and commit in one go (no evaluation in between)."""
    return commit(stage(artifacts_root, manifest, write_files))


def with_guard(write_files: Callable[[Path], None], parent: Artifact) -> Callable[[Path], None]:
    """``write_files`` plus the parent's own adapter, head and manifest under ``guard/`` (serving.guard):
    the artifact then serves the parent's answer wherever it is not sure of its own. The parent's own
    guard is left out, so guards never chain."""

    def write(directory: Path) -> None:
        write_files(directory)
        guard = directory / GUARD_DIR
        shutil.copytree(parent.adapter_dir, guard / ADAPTER_DIR)
        shutil.copy2(parent.path / HEAD_FILE, guard / HEAD_FILE)
        own = {k: v for k, v in parent.manifest.files.items() if not k.startswith(f"{GUARD_DIR}/")}
        for junk in (guard / ADAPTER_DIR).rglob("*"):  # e.g. a model card the manifest does not list
            if junk.is_file() and junk.relative_to(guard).as_posix() not in own:
                junk.unlink()
        (guard / MANIFEST).write_text(
            parent.manifest.model_copy(update={"files": own}).model_dump_json(indent=2)
        )

    return write


def publish_trained(
    artifacts_root: str | Path,
    encoder,
    domain: str,
    trained,
    parent: str | None = None,
    guard: Artifact | None = None,
):
    """Publish a ``train_adapter`` result (LoRA + head) and load it back as serving would; ``guard``: a
    guarded artifact carrying that parent (``with_guard``)."""
    from serving.artifacts import load_artifact

    manifest = ArtifactManifest(
        domain=domain,
        version=new_version(),
        parent=parent,
        base_fingerprint=encoder.fingerprint,
        labels=trained.labels,
        files={},
        lora=trained.lora_manifest(),
    )
    write = trained.write if guard is None else with_guard(trained.write, guard)
    path = publish(artifacts_root, manifest, write)
    return load_artifact(path, base_fingerprint=encoder.fingerprint, dim=encoder.dim)
