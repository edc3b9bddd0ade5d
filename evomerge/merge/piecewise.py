"""M2N2 members as recipes: piecewise linear combinations of the seed models over the flattened parameters.

Without mutation, every M2N2 child is SLERP(x, y; t) with t constant on each side of a split point, and SLERP
is a x + b y with scalars (a, b) per side. So, by induction, every archive member is a per-element linear
combination of the K seed models whose coefficients are constant between breakpoints of the flattened
parameter order (tensors in input-to-output order, each row-major). A member is stored as those pieces:

    method: piecewise
    seeds: [shift, mirror]                                # coefficient order
    models: {shift: {path: ...}, mirror: {path: ...}}
    blocks: 4096                                          # split points fall on this grid of equal blocks
    pieces: [{start: 0, coefs: [0.62, 0.41]}, {start: 1733, coefs: [0.38, 0.66]}]

a few KB whatever the model size. SLERP needs dot products of members, which are sums over pieces of
coefficient products times the seeds' Gram matrix on that range: the Gram matrix per block (blocks x K x K,
computed once in one pass over the seeds) gives them exactly, so the archive never holds a weight. Workers
build a member (`build_piecewise`) only to score it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import EvomergeError
from evomerge.merge.recipe import ModelSpec
from evomerge.merge.source_model import SourceModel

# ---- the layout of the flattened parameter vector --------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    names: tuple[str, ...]
    offsets: tuple[int, ...]  # start of each tensor in the flattened order
    n: int
    edges: tuple[int, ...]  # block edges (element offsets), len = blocks + 1

    @property
    def blocks(self) -> int:
        return len(self.edges) - 1


def make_layout(ref: SourceModel, blocks: int) -> Layout:
    from evomerge.merge.plan import _ordered

    names = tuple(_ordered(list(ref.tensors)))
    offsets, o = [], 0
    for name in names:
        offsets.append(o)
        o += int(np.prod(ref.tensors[name].shape))
    b = max(1, min(blocks, o))
    edges = tuple(int(round(v)) for v in np.linspace(0, o, b + 1))
    return Layout(names, tuple(offsets), o, edges)


def flat_segments(layout: Layout, lo: int, hi: int):
    """(tensor name, start, end) element ranges inside tensors covering the flattened range [lo, hi)."""
    for name, off in zip(layout.names, layout.offsets, strict=True):
        nxt = off + _numel(layout, name)
        if nxt <= lo or off >= hi:
            continue
        yield name, max(lo, off) - off, min(hi, nxt) - off


def _numel(layout: Layout, name: str) -> int:
    i = layout.names.index(name)
    end = layout.offsets[i + 1] if i + 1 < len(layout.names) else layout.n
    return end - layout.offsets[i]


def block_gram(sources: list[SourceModel], layout: Layout) -> np.ndarray:
    """G[b, k, l] = <seed_k, seed_l> restricted to block b (float64), in one pass over the seeds."""
    import torch

    K = len(sources)
    G = np.zeros((layout.blocks, K, K), dtype=np.float64)
    edges = np.asarray(layout.edges)
    for name, off in zip(layout.names, layout.offsets, strict=True):
        m = _numel(layout, name)
        flat = torch.stack([s.get(name).reshape(-1).to(torch.float64) for s in sources])  # K x m
        b0 = int(np.searchsorted(edges, off, side="right") - 1)
        b1 = int(np.searchsorted(edges, off + m, side="left"))
        for b in range(b0, b1):
            lo, hi = max(edges[b], off) - off, min(edges[b + 1], off + m) - off
            if hi > lo:
                seg = flat[:, lo:hi]
                G[b] += (seg @ seg.T).numpy()
        for s in sources:
            s.release(name)
    return G


# ---- members and their algebra ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Pieces:
    starts: tuple[int, ...]  # block index where each piece starts (the first is 0)
    coefs: tuple[tuple[float, ...], ...]  # per piece, one coefficient per seed

    @staticmethod
    def seed(k: int, K: int) -> Pieces:
        return Pieces((0,), (tuple(1.0 if i == k else 0.0 for i in range(K)),))

    def intervals(self, blocks: int):
        ends = list(self.starts[1:]) + [blocks]
        return [(a, b, np.asarray(c)) for a, b, c in zip(self.starts, ends, self.coefs, strict=True)]


def build_pieces(x: Pieces, layout: Layout, seeds: list[Any], name: str, out):
    """Tensor `name` of member x, written into `out` (float32 or the destination's dtype): for each piece
    over this tensor, sum_k c_k seed_k. `seeds[k].get(name)` gives seed k's tensor."""
    import torch

    i = layout.names.index(name)
    off, m = layout.offsets[i], _numel(layout, name)
    edges = layout.edges
    flat_out = out.view(-1)
    tensors = None
    for start, end, c in x.intervals(layout.blocks):
        lo, hi = max(edges[start], off), min(edges[end], off + m)
        if hi <= lo:
            continue
        if tensors is None:
            tensors = [s.get(name).reshape(-1) for s in seeds]
        acc = torch.zeros(hi - lo, dtype=torch.float32)
        for ck, t in zip(c, tensors, strict=True):
            if ck != 0.0:
                acc.add_(t[lo - off:hi - off].to(torch.float32), alpha=float(ck))
        flat_out[lo - off:hi - off] = acc.to(out.dtype)
    return out


# ---- the recipe ---------------------------------------------------------------------------------------------------

class Piece(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    start: int = Field(ge=0)
    coefs: tuple[float, ...]


class PiecewiseRecipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    method: str = "piecewise"
    seeds: tuple[str, ...]  # coefficient order (mappings may be reordered on the way through JSON)
    models: dict[str, ModelSpec]
    blocks: int = Field(ge=1)
    pieces: tuple[Piece, ...]
    dtype: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def content_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def as_pieces(self) -> Pieces:
        return Pieces(tuple(p.start for p in self.pieces), tuple(tuple(p.coefs) for p in self.pieces))

    @staticmethod
    def of(x: Pieces, models: dict[str, str], blocks: int, dtype: str | None = None) -> PiecewiseRecipe:
        return PiecewiseRecipe(seeds=tuple(models), models={n: ModelSpec(path=p) for n, p in models.items()},
                               blocks=blocks,
                               pieces=tuple(Piece(start=s, coefs=c) for s, c in zip(x.starts, x.coefs, strict=True)),
                               dtype=dtype)

    def ordered_models(self) -> list[tuple[str, ModelSpec]]:
        return [(n, self.models[n]) for n in self.seeds]

    def validate_semantics(self) -> None:
        if sorted(self.seeds) != sorted(self.models):
            raise EvomergeError("piecewise recipe: `seeds` must list each model once", "fix `seeds`")
        K = len(self.models)
        if not self.pieces or self.pieces[0].start != 0:
            raise EvomergeError("piecewise recipe: the first piece must start at block 0", "fix `pieces`")
        for p in self.pieces:
            if len(p.coefs) != K or not all(np.isfinite(p.coefs)):
                raise EvomergeError(f"piecewise recipe: piece at {p.start} needs {K} finite coefficients",
                                    "one per model, in the order of `models`")
        starts = [p.start for p in self.pieces]
        if starts != sorted(set(starts)) or starts[-1] >= self.blocks:
            raise EvomergeError("piecewise recipe: piece starts must increase and stay below `blocks`",
                                "fix `pieces`")


# ---- the search space and the export ----------------------------------------------------------------------------


def iter_piecewise(recipe: PiecewiseRecipe, sources: dict[str, SourceModel]):
    import torch

    seeds = [sources[n] for n in recipe.seeds]
    layout = make_layout(seeds[0], recipe.blocks)
    x = recipe.as_pieces()
    for name in layout.names:
        yield name, build_pieces(x, layout, seeds, name, torch.empty(seeds[0].tensors[name].shape))
        for s in seeds:
            s.release(name)


