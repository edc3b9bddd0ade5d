"""The data-flow search space (Akiba et al. 2024): vectors <-> layer paths.

With M layers across the sources (model A first) and r repetitions there are T = M*r slots, ordered
[A's layers, B's layers, ...] repeated r times. The vector holds

    an indicator gene per free slot: the slot is on the path iff its gene is > 0;
    input scales: `matrix` (the paper's W, one value per (previous layer, next layer) pair of the M
                  layers: M*M genes), `layer` (one per layer: M genes) or `none` (all 1).

Constraints (the paper's: A's first layer starts the path, A's last layer ends it): slot 0 (A's first
layer, first repetition) is always on, and A's last layer is a fixed hop appended after the last slot, so
every other slot is free, every layer of every model is reachable in every repetition (with `repeats: 1`
too), and any path ends in A's last layer. With `max_hops`, a path with too many on-slots keeps the ones
whose genes are largest. The start point favours A's own layers in the first repetition (their genes start
on, all others off; A's last layer comes from the fixed end), so the search begins at model A itself.

Use `scales: layer` or `none`, or a diagonal (separable) CMA-ES (`optimizer.diagonal: true`), when the
vector is long: with two 32-layer models the matrix alone has 4,096 genes, and full CMA-ES's covariance
update costs O(n^2) per sample and needs O(n^2) samples to learn; separable CMA learns n variances only.
"""

from __future__ import annotations

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.merge.dataflow import Hop, PathRecipe
from evomerge.merge.recipe import ModelSpec

ON, OFF = 0.5, -0.5


class DataflowSpace:
    def __init__(self, *, models: dict[str, str], layers: dict[str, int], repeats: int = 3,
                 scales: str = "matrix", scale_bounds: tuple[float, float] = (0.5, 1.5), max_hops: int | None = None,
                 dtype: str | None = None):
        if len(models) < 2:
            raise EvomergeError("a data-flow search needs model A and at least one other model",
                                "name them under dataflow.head and dataflow.partners")
        if repeats < 1:
            raise EvomergeError(f"dataflow.repeats is {repeats}", "use 1 or more repetitions")
        if scales not in ("matrix", "layer", "none"):
            raise EvomergeError(f"dataflow.scales is '{scales}'", "use matrix, layer or none")
        lo, hi = scale_bounds
        if not (np.isfinite(lo) and np.isfinite(hi) and 0 < lo < hi):
            raise EvomergeError(f"dataflow.scale_bounds {list(scale_bounds)} must be finite with 0 < low < high",
                                "e.g. [0.5, 1.5]")
        if max_hops is not None and max_hops < 2:
            raise EvomergeError(f"dataflow.max_hops is {max_hops}", "allow at least 2 hops (A's first and last)")
        for n, count in layers.items():
            if count < 1:
                raise EvomergeError(f"model '{n}' has no layers", "use decoder models with layers")
        self.models, self.layers, self.repeats = dict(models), dict(layers), repeats
        self.head = next(iter(models))
        self.scales, self.scale_bounds, self.max_hops, self.dtype = scales, (lo, hi), max_hops, dtype
        self.layer_index: dict[tuple[str, int], int] = {}
        for n in models:
            for layer in range(layers[n]):
                self.layer_index[(n, layer)] = len(self.layer_index)
        self.M = len(self.layer_index)
        self.T = self.M * repeats  # the repeated slots; self.slots[T] is the fixed end (A's last layer)
        self.slots = [key for _ in range(repeats) for key in self.layer_index] + [(self.head, layers[self.head] - 1)]
        self.first = 0
        self.last = self.T
        self.free = list(range(self.first + 1, self.T))
        self.n_ind = len(self.free)
        self.n_scale = {"matrix": self.M * self.M, "layer": self.M, "none": 0}[scales]

    def reach(self) -> list[str]:
        """What the space can and cannot reach, in words (printed when a search starts)."""
        order = " + ".join(f"{n}[{self.layers[n]}]" for n in self.models)
        lines = [f"path: {self.T} slots = {self.repeats} repetition(s) of {order}; {self.head}'s first layer starts "
                 f"it and its last layer, after the last slot, ends it ({self.n_ind} free on/off genes: every "
                 f"layer of every model can be on in every repetition)"]
        if self.max_hops:
            lines.append(f"at most {self.max_hops} hops")
        scale = {"matrix": "one input scale per (previous layer, layer) pair",
                 "layer": "one input scale per layer", "none": "no input scales"}[self.scales]
        lines.append(f"scales: {scale}, within {self.scale_bounds[0]:g}..{self.scale_bounds[1]:g} "
                     f"({self.n_scale} genes)")
        return lines

    # ---- the vector ------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.n_ind + self.n_scale

    @property
    def lower(self) -> list[float]:
        return [-1.0] * self.n_ind + [self.scale_bounds[0]] * self.n_scale

    @property
    def upper(self) -> list[float]:
        return [1.0] * self.n_ind + [self.scale_bounds[1]] * self.n_scale

    @property
    def x0(self) -> list[float]:
        # A's own layers 1..L-2 of the first repetition on: with the fixed first hop and fixed end, model A itself
        a_last = self.layers[self.head] - 1
        ind = [ON if (t < self.M and self.slots[t][0] == self.head and self.slots[t][1] < a_last) else OFF
               for t in self.free]
        return ind + [min(max(1.0, self.scale_bounds[0]), self.scale_bounds[1])] * self.n_scale

    def _scale(self, x: np.ndarray, prev: int | None, cur: int) -> float:
        if self.scales == "none" or (prev is None and self.scales == "matrix"):
            return 1.0
        w = x[self.n_ind:]
        v = w[prev * self.M + cur] if self.scales == "matrix" else w[cur]
        return float(np.clip(v, *self.scale_bounds))

    def path_slots(self, x) -> list[int]:
        """The slots on the path, in order (constraints applied)."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,) or not np.all(np.isfinite(x)):
            raise EvomergeError(f"a data-flow vector must be {self.dim} finite numbers", "check the optimizer")
        on = [(t, x[i]) for i, t in enumerate(self.free) if x[i] > 0]
        if self.max_hops is not None and len(on) > self.max_hops - 2:
            keep = sorted(on, key=lambda p: -p[1])[: self.max_hops - 2]
            on = sorted(keep)
        return [self.first, *(t for t, _ in on), self.last]

    def to_recipe(self, x) -> PathRecipe:
        x = np.asarray(x, dtype=float)
        hops, prev = [], None
        for t in self.path_slots(x):
            model, layer = self.slots[t]
            cur = self.layer_index[(model, layer)]
            hops.append(Hop(model=model, layer=layer, scale=round(self._scale(x, prev, cur), 6)))
            prev = cur
        return PathRecipe(head=self.head, models={n: ModelSpec(path=p) for n, p in self.models.items()},
                          path=tuple(hops), dtype=self.dtype)

    def from_recipe(self, recipe: PathRecipe) -> np.ndarray:
        """A vector that decodes to `recipe`'s path (raises where the path is not in this space)."""
        hops = list(recipe.path)
        a_last = self.layers[self.head] - 1
        if len(hops) < 2 or (hops[0].model, hops[0].layer) != (self.head, 0) or (
                (hops[-1].model, hops[-1].layer) != (self.head, a_last)):
            raise EvomergeError(f"the path must start with layer 0 of '{self.head}' and end with its layer "
                                f"{a_last}", "paths in this space begin and end in model A")
        x = np.array(self.x0, dtype=float)
        x[: self.n_ind] = OFF
        pos = 0  # index into self.free
        for h in hops[1:-1]:
            while pos < len(self.free) and self.slots[self.free[pos]] != (h.model, h.layer):
                pos += 1
            if pos == len(self.free):
                raise EvomergeError(f"the path does not fit {self.repeats} repetitions of the slot order",
                                    "raise dataflow.repeats")
            x[pos] = ON
            pos += 1
        if self.max_hops is not None and len(hops) > self.max_hops:
            raise EvomergeError(f"the path has {len(hops)} hops, more than max_hops {self.max_hops}",
                                "raise dataflow.max_hops")
        w = x[self.n_ind:]
        set_at: dict[int, float] = {}
        prev = None
        for h in hops:
            cur = self.layer_index[(h.model, h.layer)]
            if self.scales == "none" or (prev is None and self.scales == "matrix"):
                if h.scale != 1.0:
                    raise EvomergeError(f"hop scale {h.scale} cannot be expressed (scales: {self.scales})",
                                        "use scales: matrix or layer")
            else:
                i = prev * self.M + cur if self.scales == "matrix" else cur
                if i in set_at and set_at[i] != h.scale:
                    raise EvomergeError("the path uses one scale gene with two different values",
                                        "use scales: matrix, or equal scales for repeated transitions")
                set_at[i] = h.scale
                w[i] = h.scale
            prev = cur
        return x
