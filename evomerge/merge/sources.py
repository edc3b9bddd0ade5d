"""Source models: Hugging Face model directories read from safetensors headers and memory-mapped.

Everything about a source's tensors (names, shapes, dtypes, files) comes from the safetensors headers, so
compatibility is checked before any weight is read. Tensors are zero-copy views of private (copy-on-write)
memory maps: the page cache is shared between processes and nothing is copied until used.
Pickle weights (`*.bin`, `*.pt`, `*.pth`, `*.ckpt`) are refused.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError

# safetensors dtype names -> torch dtype attribute names and element sizes
ST_DTYPES = {"F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2), "F64": ("float64", 8)}
TORCH_TO_ST = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors name, e.g. F32
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one safetensors file's header (no tensor data is read)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("file shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > size - 8 or n > 100 * 2**20:
                raise ValueError("header length is larger than the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise EvomergeError(f"{path}: not a readable safetensors file ({e})",
                            "re-save the model with `save_pretrained(..., safe_serialization=True)`") from None
    base = 8 + n
    out: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            s, e = (int(x) for x in meta["data_offsets"])
            shape = tuple(int(d) for d in meta["shape"])
            dtype = str(meta["dtype"])
        except (KeyError, TypeError, ValueError):
            raise EvomergeError(f"{path}: tensor '{name}' has a damaged header entry {meta!r}",
                                "download or copy the file again") from None
        want = _ST_ITEMSIZE.get(dtype)
        if want is not None:
            want *= math.prod(shape)
        if s < 0 or e < s or (want is not None and e - s != want):
            raise EvomergeError(f"{path}: tensor '{name}' has data offsets [{s}, {e}] ({e - s} bytes) but its shape "
                                f"{list(shape)} of {dtype} needs {want} bytes: the file's header is damaged",
                                "download or copy the file again, or re-save the model with save_pretrained")
        if base + e > size:
            raise EvomergeError(f"{path}: tensor '{name}' extends past the end of the file (truncated download?)",
                                "download or copy the file again")
        out[name] = TensorInfo(path, dtype, shape, base + s, base + e)
    return out


@dataclass
class SourceModel:
    """One model directory: its config, tensor index and (once opened) memory maps."""

    name: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    ref: str = ""  # the reference it was opened from (model_key form: a resolved path or hf:ORG/NAME)
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)

    @property
    def num_layers(self) -> int | None:
        cfg = self.config.get("text_config", self.config)
        return cfg.get("num_hidden_layers")

    def get(self, tensor_name: str):
        """The tensor as a zero-copy torch view of the file's memory map."""
        import torch

        info = self.tensors[tensor_name]
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[info.file] = mm
        dtype = getattr(torch, ST_DTYPES[info.dtype][0])
        count = (info.end - info.start) // ST_DTYPES[info.dtype][1]
        if count == 0:
            return torch.empty(info.shape, dtype=dtype)
        return torch.frombuffer(mm, dtype=dtype, count=count, offset=info.start).view(info.shape)

    def release(self, tensor_name: str) -> None:
        """Drop the tensor's pages from this process's memory (they stay in the page cache and are read
        again if touched). A one-pass build calls this after each tensor, so its resident memory stays at
        a few tensors instead of growing to the size of all sources."""
        info = self.tensors[tensor_name]
        mm = self._maps.get(info.file)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = -(-info.start // page) * page
        end = (info.end // page) * page
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def advise_willneed(self) -> None:
        """Ask the kernel to read the files ahead (cheap; speeds up the first pass over cold files)."""
        for info in {i.file for i in self.tensors.values()}:
            mm = self._maps.get(info)
            if mm is None:
                with open(info, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
                self._maps[info] = mm
            if hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_WILLNEED)

    def close(self) -> None:
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # a tensor still views it; the map closes when that tensor dies
                pass
        self._maps.clear()


@dataclass
class ResidentSource(SourceModel):
    """A source whose tensors were copied once onto a device (a GPU): `get` returns them without a transfer."""

    cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def get(self, tensor_name: str):
        return self.cache[tensor_name]

    def release(self, tensor_name: str) -> None:
        pass

    def close(self) -> None:
        self.cache.clear()


def source_bytes(src: SourceModel) -> int:
    return sum(i.end - i.start for i in src.tensors.values())


def place_sources(sources: dict[str, SourceModel], device, mode: str = "auto",
                  budget_bytes: int | None = None) -> tuple[dict[str, SourceModel], list[str]]:
    """Keep sources resident on `device` where they fit; the rest stay memory-mapped and stream per tensor.

    mode: "auto" (resident while they fit in `budget_bytes`, by default the device's free memory less 20%
    and 2 GiB; never on CPU, where the memory map already is the resident copy), "always" (on any device,
    within `budget_bytes` if given) or "never".
    Returns the sources (resident ones replaced) and the names placed on the device.
    """
    import torch

    if mode not in ("auto", "always", "never"):
        raise EvomergeError(f"device_sources is '{mode}'", "use auto, always or never")
    device = torch.device(device)
    if mode == "never" or (mode == "auto" and device.type == "cpu"):
        return dict(sources), []
    if budget_bytes is None:
        if mode == "always":
            budget_bytes = 1 << 62
        elif device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget_bytes = int(free * 0.8) - (2 << 30)
        else:
            budget_bytes = 0
    out: dict[str, SourceModel] = dict(sources)
    placed: list[str] = []
    for name, src in sources.items():
        need = source_bytes(src)
        if need > budget_bytes:
            continue
        cache = {t: src.get(t).to(device, copy=True) for t in src.tensors}
        src.close()
        out[name] = ResidentSource(name=src.name, path=src.path, config=src.config, tensors=src.tensors,
                                   ref=src.ref, cache=cache)
        placed.append(name)
        budget_bytes -= need
    return out, placed


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
