#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs offline on a GPU machine (Python 3.12, x86-64, PyTorch (CUDA) and
# transformers installed, no network, no ray / lm-eval / cma / optuna). Run it HERE, where the package index is
# reachable; it writes them to .bench/gpu-wheels/ (ignored by git: the device tool takes it with
# carry: [".bench/gpu-wheels"]). See benchmarks/GPU_CHECK.md.
#
#   bash benchmarks/gpu_wheels.sh [DEST]        # default DEST: .bench/gpu-wheels
#
# What is carried and why (sizes measured when this was written; the script checks the total):
#   engine  pydantic + pydantic-core (cp312 build) + annotated-types + typing-inspection + typing-extensions:
#           the merge engine's recipes are pydantic models; the image has no pydantic (~2.9 MB).
#   lm-eval lm_eval 0.4.13 and what its requirements need that the image lacks: datasets, evaluate, dill,
#           multiprocess, fsspec (datasets caps it), more-itertools, pytablewriter and its helpers, rouge-score,
#           nltk, defusedxml, sqlitedict, word2number, pytz (~17 MB; lm_eval's own wheel is 9 MB of task YAML).
#           pyarrow is NOT carried (55 MB for cp312): the image's pyarrow is used. datasets 5.2.0 needs
#           pyarrow >= 24; datasets 5.0.0 (pyarrow >= 21) and fsspec 2026.4.0 come along as the resolver's
#           fallback for an older image pyarrow.
#   never   ray (79 MB for cp312: alone over the 64 MiB the device tool carries; the check calls the worker
#           directly, without Ray), vllm (its CUDA wheel is 336 MB and pins its own torch), cma / cmaes / optuna
#           (the check runs no search), numba + llvmlite (~45 MB; only CPU merges use its kernels, and without it
#           they take the torch form).
# sqlitedict, word2number and rouge-score 0.1.2 publish no wheels: they are built here from their sdists
# (pure Python, so the wheels are the same on every machine).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.bench/gpu-wheels}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# 64 MiB travel in all (the working tree, ~3.5 MiB of tracked files, plus the carried wheels): keep room.
LIMIT_MIB=${LIMIT_MIB:-56}

ENGINE=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
        typing-extensions==4.16.0)
LMEVAL=(lm-eval==0.4.13 datasets==5.2.0 datasets==5.0.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19
        fsspec==2026.9.0 fsspec==2026.4.0 more-itertools==11.2.1 nltk==3.10.4 defusedxml==0.7.1
        pytablewriter==1.2.1 dataproperty==1.1.1 mbstrdecoder==1.1.5 chardet==6.0.0.post1 pathvalidate==3.3.1
        tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 pytz==2026.6)
SDIST_ONLY=(sqlitedict==2.1.0 word2number==1.1 rouge-score==0.1.2)

TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

rm -rf "$DEST"
mkdir -p "$DEST"
echo "downloading into $DEST (Python 3.12, manylinux x86-64)"
for req in "${ENGINE[@]}" "${LMEVAL[@]}"; do
    "$PY" -m pip download -q --no-deps "${TARGET[@]}" -d "$DEST" "$req"
done
echo "building pure-Python wheels from sdists: ${SDIST_ONLY[*]}"
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
for req in "${SDIST_ONLY[@]}"; do
    "$PY" -m pip wheel -q --no-deps --no-binary :all: -w "$BUILD" "$req"
done
for w in "$BUILD"/*.whl; do
    case "$w" in
        *-py3-none-any.whl|*-py2.py3-none-any.whl) cp "$w" "$DEST/" ;;
        *) echo "error: $w is not a pure-Python wheel" >&2; exit 1 ;;
    esac
done

# What gpu_check.sh installs (pip resolves the rest from the carried wheels and what the machine has).
printf '%s\n' "pydantic==2.14.4" > "$DEST/engine.txt"
printf '%s\n' "lm-eval==0.4.13" > "$DEST/lmeval.txt"
git rev-parse HEAD > "$DEST/PREPARED_AT_COMMIT" 2>/dev/null || echo unknown > "$DEST/PREPARED_AT_COMMIT"

(cd "$DEST" && sha256sum -- *.whl > SHA256SUMS)
total=$(du -cb "$DEST" | tail -1 | cut -f1)
count=$(ls "$DEST"/*.whl | wc -l)
ls -l "$DEST"/*.whl | awk '{printf "  %9d  %s\n", $5, $9}'
awk -v t="$total" -v n="$count" -v l="$LIMIT_MIB" 'BEGIN {printf "%d wheels, %.1f MiB in all (limit %d MiB)\n", n, t / 1048576, l}'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
    echo "error: the wheels are over $LIMIT_MIB MiB; the device tool carries 64 MiB in all" >&2
    exit 1
fi

# Resolve the install gpu_check.sh will do, for Python 3.12, against stand-ins for the GPU image's packages.
"$PY" benchmarks/gpu_wheels_check.py "$DEST"
