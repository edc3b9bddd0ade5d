"""A source model as the merge reads it: the tensors of its safetensors files, memory-mapped and read on demand (the
header checked against the file), or resident on a device."""

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


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors name, e.g. F32
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


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
    # per-tensor statistics of merge methods that depend on the source tensors alone (MergeMethod.source_stats),
    # kept as long as the source is open: {(method, the sources and tensors it read): {name: value}}
    stats: dict[tuple, dict] = field(default_factory=dict, repr=False, compare=False)

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
        self.stats.clear()
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
        self.stats.clear()


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


_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
