"""M2N2's search space: members are Pieces over the seed models (piecewise recipes), compared through the
seeds' per-block Gram matrices (PiecewiseAlgebra), so crossover and attraction never touch a tensor."""

from __future__ import annotations

from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.merge.piecewise import Pieces, PiecewiseRecipe, block_gram, make_layout


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

    def seeds(self, earlier: dict[str, list[dict[str, Any]]] | None = None, top: int = 5) -> list[Pieces]:
        """The seed models, then the `top` best members of each earlier M2N2 run over the same seeds
        (`earlier`: each run's name -> its ledger records, read by the run layer)."""
        out = [Pieces.seed(k, len(self.models)) for k in range(len(self.models))]
        for run, records in (earlier or {}).items():
            out += self._best_of(run, records, top)
        return out

    def _best_of(self, run: str, records: list[dict[str, Any]], top: int) -> list[Pieces]:
        from evomerge.merge.sources import model_key

        recs = [r for r in records if r["type"] == "eval" and r["fitness"] is not None
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
