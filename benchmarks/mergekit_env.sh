#!/usr/bin/env bash
# Create an isolated virtualenv with mergekit, used only as a reference/baseline in benchmarks.
# mergekit is NOT a dependency of evomerge, so it lives in its own venv:
#   ${MERGEKIT_VENV:-.bench/mergekit-venv}   (relative to the repo root)
#
# Idempotent: does nothing if the venv already has a working `mergekit-yaml`.
# Prints the path of the venv's python on stdout as its last line.
#
# Notes:
# - torch is installed FIRST and pinned (torch==2.13.0) through a constraint file for the mergekit
#   install too: mergekit 0.1.5 only asks for torch>=2.0.0, but any transitive resolution that
#   touched torch unpinned could pull a multi-GB CUDA build. With the constraint pip keeps 2.13.0.
# - mergekit 0.1.5 requires transformers>=5,<6, accelerate>=1.6, peft>=0.18, datasets, scipy, ...
# - Override the Python used to create the venv with PYTHON=..., and the torch pin with TORCH_SPEC=...
#   (e.g. add `PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu` on a machine where
#   PyPI's torch would be a CUDA build).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${MERGEKIT_VENV:-.bench/mergekit-venv}"
PY="$VENV/bin/python"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
MERGEKIT_SPEC="${MERGEKIT_SPEC:-mergekit==0.1.5}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [[ -x "$VENV/bin/mergekit-yaml" ]] && "$VENV/bin/mergekit-yaml" --help >/dev/null 2>&1; then
    echo "mergekit venv already set up: $VENV" >&2
else
    echo "creating mergekit venv at $VENV" >&2
    mkdir -p "$(dirname "$VENV")"
    "${PYTHON:-python3}" -m venv "$VENV"
    "$PY" -m pip install --quiet --upgrade pip >&2
    "$PY" -m pip install "$TORCH_SPEC" >&2
    # Constraint file keeps the torch installed above while resolving mergekit's dependencies.
    constraints="$(mktemp)"
    trap 'rm -f "$constraints"' EXIT
    echo "$TORCH_SPEC" >"$constraints"
    "$PY" -m pip install -c "$constraints" "$MERGEKIT_SPEC" >&2
    "$VENV/bin/mergekit-yaml" --help >/dev/null
fi

cd "$VENV/bin" && echo "$(pwd -P)/python"
