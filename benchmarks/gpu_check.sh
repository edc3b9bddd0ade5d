#!/usr/bin/env bash
# The GPU check in one command (benchmarks/GPU_CHECK.md): on a GPU machine without network that has PyTorch (CUDA)
# and transformers, install evomerge's missing dependencies from the carried wheels (.bench/gpu-wheels, made by
# benchmarks/gpu_wheels.sh), then run benchmarks/gpu_check.py: the CUDA tests, the merge engine on the GPU
# against the memory-traffic bound, the hf backend on a 1B-class random Llama. Finishes within ~9.5 minutes.
#
#   bash benchmarks/gpu_check.sh                 # on the GPU machine (repository root); report in $OUT
#   bash benchmarks/gpu_check.sh --cpu-dry-run   # anywhere: tiny sizes on the CPU, pip only --dry-run
#
# Other arguments go to gpu_check.py. Environment: PYTHON (default python3), WHEELS (default .bench/gpu-wheels),
# OUT (report folder; default .bench/gpu-check), BUDGET_S (default 560: gpu_check.py ends its stages by then,
# counted from this script's start; the device tool's limit is 600 s).
set -uo pipefail
T0=$(date +%s)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
W=${WHEELS:-.bench/gpu-wheels}
OUTDIR=${OUT:-.bench/gpu-check}
BUDGET_S=${BUDGET_S:-560}
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_check.log"
DRY=0
for a in "$@"; do [ "$a" = --cpu-dry-run ] && DRY=1; done
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 GPU_CHECK_T0=$T0 GPU_CHECK_COMMAND="bash benchmarks/gpu_check.sh${*:+ $*}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
echo "== gpu_check.sh $(date -u +%FT%TZ) on $(hostname); python: $(command -v "$PY") ($("$PY" -V 2>&1))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
if [ ! -d "$W" ]; then
    echo "== no $W: nothing installed (make it with bash benchmarks/gpu_wheels.sh and carry it)"
else
    PIPMODE=()
    [ $DRY = 1 ] && PIPMODE=(--dry-run)
    echo "== installing from $W ($(ls "$W"/*.whl | wc -l) wheels) into $("$PY" -c 'import sys; print(sys.prefix)')${PIPMODE:+ (dry run)}"
    for req in engine lmeval; do
        if timeout 150 "$PY" -m pip install "${PIPMODE[@]}" -q --no-index --no-compile --no-cache-dir \
                --find-links "$W" -r "$W/$req.txt"; then
            echo "install $req ($(tr '\n' ' ' < "$W/$req.txt")): ok"
        elif [ $DRY = 0 ]; then
            # The resolver found no consistent set (an image package too old or too new for a carried wheel):
            # install, without their requirements, the newest carried wheel of every distribution not present.
            echo "install $req: the resolver failed; installing the missing distributions with --no-deps"
            mapfile -t MISSING < <("$PY" - "$W" <<'EOF'
import importlib.metadata as md, re, sys
from pathlib import Path
newest = {}
for f in sorted(Path(sys.argv[1]).glob("*.whl")):
    name, ver = f.name.split("-")[:2]
    key = re.sub(r"[-_.]+", "-", name).lower()
    parts = tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.+]", ver))
    if key not in newest or parts > newest[key][0]:
        newest[key] = (parts, f)
for key, (_, f) in sorted(newest.items()):
    try:
        md.version(key)
    except md.PackageNotFoundError:
        print(f)
EOF
)
            if [ ${#MISSING[@]} -gt 0 ]; then
                timeout 150 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "${MISSING[@]}" \
                    && echo "installed --no-deps: ${MISSING[*]}" || echo "the --no-deps install failed too"
            fi
        else
            echo "install $req: the resolver failed (dry run: nothing changed)"
        fi
    done
    "$PY" -c 'import importlib.metadata as m
for d in ("pydantic", "lm_eval", "datasets", "evaluate", "pyarrow", "fsspec", "typing_extensions"):
    try: print(f"  {d} {m.version(d)}")
    except m.PackageNotFoundError: print(f"  {d} not installed")'
fi
echo "== install done after $(( $(date +%s) - T0 )) s"
} 2>&1 | tee -a "$LOG"

# gpu_check.py ends its stages by T0 + BUDGET_S; this hard limit only catches a hang in the driver itself.
LEFT=$(( T0 + BUDGET_S + 30 - $(date +%s) ))
timeout "$LEFT" "$PY" benchmarks/gpu_check.py --budget-s "$BUDGET_S" "$@" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "== gpu_check.sh done in $(( $(date +%s) - T0 )) s (rc $rc); report: $OUTDIR/gpu_check.md" | tee -a "$LOG"
exit "$rc"
