"""Source models: Hugging Face model directories read from safetensors headers and memory-mapped.

Everything about a source's tensors (names, shapes, dtypes, files) comes from the safetensors headers, so
compatibility is checked before any weight is read. Tensors are zero-copy views of private (copy-on-write)
memory maps: the page cache is shared between processes and nothing is copied until used.
Pickle weights (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`) are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.merge.source_model import ST_DTYPES, SourceModel, TensorInfo, read_header

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


HUB_PREFIX = "hf:"
HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.tiktoken", "*.txt",
             "*.jinja"]  # never pickles


def is_hub_ref(path: str | Path) -> bool:
    return str(path).startswith(HUB_PREFIX)


def split_adapter_ref(path: str | Path) -> tuple[str, str] | None:
    """`BASE+ADAPTER` (mergekit's syntax for a LoRA adapter on a base) as (base, adapter), else None.
    A path that exists as written is never split, so directory names may contain '+'."""
    s = str(path)
    if "+" not in s or (not is_hub_ref(s) and Path(s).expanduser().exists()):
        return None
    base, _, adapter = s.rpartition("+")
    return (base, adapter) if base and adapter else None


def model_key(path: str | Path) -> str:
    """A model reference in a canonical form, for comparing two references to the same model."""
    pair = split_adapter_ref(path)
    if pair is not None:
        return f"{model_key(pair[0])}+{model_key(pair[1])}"
    return str(path) if is_hub_ref(path) else str(Path(path).expanduser().resolve())


def local_model_dir(name: str, path: str | Path) -> Path:
    """The local directory of a model reference: a path, or `hf:ORG/NAME[@REVISION]` for a model on the
    Hugging Face hub, taken from the local cache (downloaded into it first unless HF_HUB_OFFLINE=1)."""
    if not is_hub_ref(path):
        return Path(path).expanduser()
    repo, _, revision = str(path)[len(HUB_PREFIX):].partition("@")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 - offline and not cached, unknown repo, no network, no access
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        why = "it is not in the local cache and HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}: {e}"
        raise EvomergeError(
            f"model '{name}': cannot get {path} from the Hugging Face hub ({why.splitlines()[0][:300]})",
            f"download it on every node first (`huggingface-cli download {repo}`), or give a local directory",
        ) from None


def open_source(name: str, path: str | Path) -> SourceModel:
    """Index a model directory from its config and safetensors headers; refuse anything else.

    A PEFT LoRA adapter directory (or `BASE+ADAPTER`) opens as its base with the adapter applied per
    tensor (evomerge.merge.lora)."""
    pair = split_adapter_ref(path)
    if pair is not None:
        from evomerge.merge.lora import open_adapter

        base = open_source(name, pair[0])
        return open_adapter(name, local_model_dir(name, pair[1]), base, model_key(path))
    p = local_model_dir(name, path)
    if p.is_dir() and (p / "adapter_config.json").is_file() and not any(
            (p / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        from evomerge.merge.lora import adapter_base_ref, open_adapter, read_adapter_config

        base_ref = adapter_base_ref(p, read_adapter_config(p))
        if base_ref is None:
            raise EvomergeError(
                f"model '{name}': '{p}' is a LoRA adapter whose base "
                f"('{read_adapter_config(p).get('base_model_name_or_path')}') is not a local directory",
                f"name its base with mergekit's syntax: BASE_DIR+{path}")
        return open_adapter(name, p, open_source(name, base_ref), model_key(path))
    if not p.exists():
        raise EvomergeError(
            f"model '{name}': directory '{p}' does not exist",
            "point `path` at a local Hugging Face model directory, or name a hub model as `hf:ORG/NAME` "
            "(fetched into the Hugging Face cache, e.g. `huggingface-cli download ORG/NAME`)",
        )
    if not p.is_dir():
        raise EvomergeError(f"model '{name}': '{p}' is a file, not a model directory",
                            "give the directory that holds config.json and *.safetensors")
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise EvomergeError(f"model '{name}': '{p}' has no config.json", "use a Hugging Face model directory")
    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EvomergeError(f"model '{name}': {cfg_path} is not valid JSON ({e})", "repair the file") from None
    files = _weight_files(name, p)
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        for tname, info in read_header(f).items():
            if tname in tensors:
                raise EvomergeError(f"model '{name}': tensor '{tname}' appears in two files "
                                    f"({tensors[tname].file.name}, {f.name})", "remove the stray shard")
            tensors[tname] = info
    bad = sorted({i.dtype for i in tensors.values()} - set(ST_DTYPES))
    if bad:
        raise EvomergeError(f"model '{name}': tensors of type {', '.join(bad)} cannot be merged",
                            "merge unquantised floating-point weights (float32, bfloat16 or float16)")
    return SourceModel(name=name, path=p, config=config, tensors=tensors, ref=model_key(path))


def _weight_files(name: str, p: Path) -> list[Path]:
    index = p / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise EvomergeError(f"model '{name}': {index} is not a valid shard index ({e})",
                                "re-save the model") from None
        files = []
        for fname in dict.fromkeys(weight_map.values()):
            f = p / fname
            if not f.is_file():
                raise EvomergeError(f"model '{name}': shard '{fname}' listed in {index.name} is missing",
                                    "download or copy the missing shard")
            files.append(f)
        return files
    files = sorted(p.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(x.name for x in p.iterdir() if x.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise EvomergeError(
            f"model '{name}': '{p}' holds only pickle weights ({', '.join(pickles[:3])}); evomerge loads "
            "safetensors only, since unpickling can run arbitrary code",
            "convert once in an environment you trust: `AutoModelForCausalLM.from_pretrained(DIR)"
            ".save_pretrained(OUT, safe_serialization=True)`",
        )
    raise EvomergeError(f"model '{name}': no *.safetensors weights in '{p}'", "point at a model directory with weights")
