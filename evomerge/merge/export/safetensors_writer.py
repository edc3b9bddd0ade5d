"""A streaming safetensors writer: headers are laid out up front from names, dtypes and shapes, then
tensors are written one at a time in order, so writing a model never holds more than one tensor."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from evomerge.merge.source_model import ST_DTYPES, TORCH_TO_ST


class StreamingWriter:
    def __init__(self, out_dir: Path, entries: list[tuple[str, tuple[int, ...]]], dtype: str,
                 max_shard_bytes: int | None = None, metadata: dict[str, str] | None = None):
        self.out_dir = out_dir
        self.dtype = getattr(torch, dtype)
        st = TORCH_TO_ST[dtype]
        esize = ST_DTYPES[st][1]
        shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
        used = 0
        for name, shape in entries:
            nbytes = math.prod(shape) * esize
            if max_shard_bytes and shards[-1] and used + nbytes > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, shape, nbytes))
            used += nbytes
        n = len(shards)
        self.files: list[Path] = []
        self.order: list[str] = []
        self.where: dict[str, int] = {}
        self._handles = []
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
            off = 0
            for name, shape, nbytes in shard:
                header[name] = {"dtype": st, "shape": list(shape), "data_offsets": [off, off + nbytes]}
                off += nbytes
                self.order.append(name)
                self.where[name] = i
                weight_map[name] = fname
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            path = out_dir / fname
            f = open(path, "wb")
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            self.files.append(path)
            self._handles.append(f)
        if n > 1:
            total = sum(nb for s in shards for _, _, nb in s)
            (out_dir / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        self._next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self._next]
        if name != expected:
            raise RuntimeError(f"tensors must be written in header order: got {name}, expected {expected}")
        t = tensor.detach().to("cpu", self.dtype).contiguous()
        self._handles[self.where[name]].write(t.view(torch.uint8).numpy()
                                              if t.numel() else b"")
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.order):
            raise RuntimeError(f"{len(self.order) - self._next} tensor(s) were never written")
        for f in self._handles:
            f.close()

    def abort(self) -> None:
        for f in self._handles:
            f.close()
