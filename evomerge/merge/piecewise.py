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
from evomerge.merge.sources import SourceModel

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


class PiecewiseAlgebra:
    """M2N2's member operations on Pieces, exact through the seeds' per-block Gram matrices."""

    def __init__(self, gram: np.ndarray):
        self.gram = np.asarray(gram, dtype=np.float64)
        self.dim = self.gram.shape[0]  # split points: block indices
        self.prefix = np.concatenate([np.zeros((1, *self.gram.shape[1:])), np.cumsum(self.gram, axis=0)])

    def _G(self, a: int, b: int) -> np.ndarray:
        return self.prefix[b] - self.prefix[a]

    def _pairs(self, x: Pieces, y: Pieces, lo: int, hi: int):
        cuts = sorted({lo, hi, *(s for s in x.starts if lo < s < hi), *(s for s in y.starts if lo < s < hi)})
        xi, yi = x.intervals(self.dim), y.intervals(self.dim)
        for a, b in zip(cuts, cuts[1:], strict=False):
            cx = next(c for s, e, c in xi if s <= a < e)
            cy = next(c for s, e, c in yi if s <= a < e)
            yield a, b, cx, cy

    def segment_dot(self, x: Pieces, y: Pieces, lo: int, hi: int) -> float:
        return float(sum(cx @ self._G(a, b) @ cy for a, b, cx, cy in self._pairs(x, y, lo, hi)))

    def dot(self, x: Pieces, y: Pieces) -> float:
        return self.segment_dot(x, y, 0, self.dim)

    def combine(self, x: Pieces, y: Pieces, split: int, a: tuple[float, float], b: tuple[float, float]) -> Pieces:
        starts, coefs = [], []
        for lo, hi in ((0, split), (split, self.dim)):
            if hi <= lo:
                continue
            side = 0 if lo < split else 1
            for s, _, cx, cy in self._pairs(x, y, lo, hi):
                c = tuple(float(v) for v in a[side] * cx + b[side] * cy)
                if coefs and coefs[-1] == c:
                    continue  # merge equal neighbours
                starts.append(s)
                coefs.append(c)
        return Pieces(tuple(starts), tuple(coefs))

    def mutate(self, x, rng, std):
        raise EvomergeError("M2N2 members in recipe form cannot be mutated (mutation leaves the span of the "
                            "seed models)", "set mutation_std: 0 (merging trained models needs no mutation)")


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

class M2N2Space:
    """Members (Pieces over the seed models) <-> piecewise recipes; the Gram matrices come from one pass."""

    def __init__(self, models: dict[str, str], blocks: int, dtype: str | None = None):
        from evomerge.merge.plan import check_compatible
        from evomerge.merge.sources import open_source

        self.models = dict(models)
        sources = {n: open_source(n, p) for n, p in self.models.items()}
        try:
            check_compatible(sources, next(iter(sources)))
            self.layout = make_layout(next(iter(sources.values())), blocks)
            self.gram = block_gram(list(sources.values()), self.layout)
        finally:
            for s in sources.values():
                s.close()
        self.dtype = dtype

    def seeds(self, seed_runs: list[str] = (), top: int = 5) -> list[Pieces]:
        """The seed models, then the `top` best members of each earlier M2N2 run over the same seeds."""
        out = [Pieces.seed(k, len(self.models)) for k in range(len(self.models))]
        for run in seed_runs:
            out += self._best_of(run, top)
        return out

    def _best_of(self, run: str, top: int) -> list[Pieces]:
        from evomerge.merge.sources import model_key
        from evomerge.run.rundir import RunDir

        rd = RunDir(run)
        if not rd.exists():
            raise EvomergeError(f"m2n2.seed_runs: '{run}' is not a run directory", "give an earlier m2n2 --run-dir")
        recs = [r for r in rd.records() if r["type"] == "eval" and r["fitness"] is not None
                and r["recipe"].get("method") == "piecewise"]
        mine = [model_key(p) for p in self.models.values()]  # in coefficient order
        picked = []
        for r in sorted(recs, key=lambda r: -r["fitness"]):
            rec = PiecewiseRecipe.model_validate(r["recipe"])
            if [model_key(m.path) for _, m in rec.ordered_models()] != mine or rec.blocks != self.layout.blocks:
                raise EvomergeError(f"m2n2.seed_runs: {run} merged other seed models or another block grid",
                                    "seed from a run with the same m2n2.seeds (in the same order) and blocks")
            x = rec.as_pieces()
            if x not in picked:
                picked.append(x)
            if len(picked) == top:
                break
        return picked

    def to_recipe(self, x: Pieces) -> PiecewiseRecipe:
        return PiecewiseRecipe.of(x, self.models, self.layout.blocks, self.dtype)


def iter_piecewise(recipe: PiecewiseRecipe, sources: dict[str, SourceModel]):
    import torch

    seeds = [sources[n] for n in recipe.seeds]
    layout = make_layout(seeds[0], recipe.blocks)
    x = recipe.as_pieces()
    for name in layout.names:
        yield name, build_pieces(x, layout, seeds, name, torch.empty(seeds[0].tensors[name].shape))
        for s in seeds:
            s.release(name)


def write_piecewise_model(recipe: PiecewiseRecipe, out_dir, *, card_extra: str = ""):
    """Export a piecewise (M2N2) member as an ordinary model directory (atomically)."""
    from pathlib import Path

    from evomerge.merge.export.model_dir import write_dir
    from evomerge.merge.plan import check_compatible
    from evomerge.merge.sources import ST_DTYPES, open_source

    recipe.validate_semantics()
    sources = {n: open_source(n, m.path) for n, m in recipe.ordered_models()}
    try:
        first = next(iter(sources.values()))
        check_compatible(sources, first.name)
        dtype = recipe.dtype or ST_DTYPES[next(iter(first.tensors.values())).dtype][0]
        layout = make_layout(first, recipe.blocks)
        config = dict(first.config)
        config["torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"] = dtype
        card = ("---\nlibrary_name: transformers\ntags:\n- merge\n- evomerge\n- m2n2\n---\n# M2N2 merge\n\n"
                f"Built by evomerge from an M2N2 archive member: a per-element linear combination of "
                f"{len(sources)} models ({', '.join(f'`{n}`' for n in sources)}) with {len(recipe.pieces)} "
                f"pieces over the flattened parameters ({recipe.blocks} blocks). mergekit has no method that "
                "splits a tensor between coefficients, so there is no mergekit config for it.\n\n"
                f"## Recipe (evomerge)\n\n```yaml\n{recipe.to_yaml()}```\n" + (f"\n{card_extra}" if card_extra else ""))
        return write_dir(Path(out_dir), [(n, first.tensors[n].shape) for n in layout.names],
                         iter_piecewise(recipe, sources), dtype, config, tokenizer_dir=first.path,
                         generation_dir=first.path, files={"evomerge_recipe.yaml": recipe.to_yaml(), "README.md": card},
                         metadata={"evomerge_recipe_hash": recipe.content_hash()})
    finally:
        for s in sources.values():
            s.close()
