"""Parameter-space search spaces: plain vectors <-> merge recipes.

A space fixes the models, base and method, and searches the method's numeric parameters (read off the
method registry) per layer group, per filter and per model:

    granularity: "model" (one group), "layer" (each block) or N (every N blocks); with `embed_head`,
                 embeddings and the final norm/head get groups of their own
    filters:     substrings such as ["self_attn", "mlp"]; each gets its own values, the rest share one

Each dimension is one (model, parameter, group, filter) value with bounds and a start value. Vectors map to
recipes whose settings are per-layer value lists (one entry per layer, so each layer gets exactly its
group's value) and filter rules: readable, and exactly what mergekit builds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.merge.methods import get_method
from evomerge.merge.recipe import ModelSpec, Recipe

EMBED_FILTERS = ("embed_tokens",)
HEAD_FILTERS = ("lm_head", "model.norm")


@dataclass(frozen=True)
class Dim:
    model: str | None  # None for method-level parameters
    param: str
    group: str  # "all", "layers a-b", "embed", "head"
    filter: str | None
    lower: float
    upper: float
    x0: float

    @property
    def name(self) -> str:
        who = f"{self.model}." if self.model else ""
        f = f"[{self.filter}]" if self.filter else ""
        return f"{who}{self.param}@{self.group}{f}"


class _Dims:
    """Bounds and start of a space whose `dims` list its dimensions (what an optimizer is built from)."""

    dims: list[Dim]

    @property
    def dim(self) -> int:
        return len(self.dims)

    @property
    def lower(self) -> list[float]:
        return [d.lower for d in self.dims]

    @property
    def upper(self) -> list[float]:
        return [d.upper for d in self.dims]

    @property
    def x0(self) -> list[float]:
        return [d.x0 for d in self.dims]


class ParameterSpace(_Dims):
    def __init__(self, *, method: str, models: dict[str, str], base: str | None, num_layers: int,
                 granularity: str | int = "model", filters: list[str] | None = None, embed_head: bool = False,
                 search: list[str] | None = None, bounds: dict[str, tuple[float, float]] | None = None,
                 fixed: dict[str, Any] | None = None, x0: dict[str, float] | float | None = None,
                 seed: int = 0, dtype: str | None = None):
        self.method = get_method(method)
        self.models = dict(models)
        self.base = base
        self.num_layers = num_layers
        self.filters = list(filters or [])
        self.embed_head = embed_head and granularity != "model"
        self.fixed = dict(fixed or {})
        self.seed, self.dtype = seed, dtype
        if granularity == "model":
            size = num_layers
        elif granularity == "layer":
            size = 1
        elif isinstance(granularity, int) and granularity >= 1:
            size = granularity
        else:
            raise EvomergeError(f"granularity {granularity!r} is not 'model', 'layer' or a positive integer",
                                "set granularity to model, layer or N (blocks per group)")
        self.granularity = granularity
        self.layer_groups = [(a, min(num_layers, a + size)) for a in range(0, num_layers, size)]
        bounds = dict(bounds or {})
        numeric = [p for p in self.method.tensor_params + self.method.global_params if p.kind == "float"]
        names = [p.name for p in numeric]
        if search is None:
            search = [p.name for p in numeric if p.searched_by_default and p.name not in self.fixed]
        for s in search:
            if s not in names:
                raise EvomergeError(f"cannot search '{s}' with {method}",
                                    f"searchable parameters of {method}: {', '.join(names) or 'none'}")
        self.search = list(search)
        x0s = x0 if isinstance(x0, dict) else {}
        inputs = [m for m in models if m != base] if self.method.uses_base(base) else list(models)
        self.inputs = inputs
        dims: list[Dim] = []
        for p in numeric:
            if p.name not in self.search:
                continue
            lo, hi = bounds.get(p.name, p.search or (p.low, p.high))
            start = x0s.get(p.name, x0 if isinstance(x0, (int, float)) else (lo + hi) / 2)
            if not lo <= start <= hi:
                raise EvomergeError(f"space.x0 for '{p.name}' ({start}) lies outside its bounds [{lo}, {hi}]",
                                    f"give an x0 inside [{lo}, {hi}], or widen space.bounds.{p.name}")
            owners = inputs if p in self.method.tensor_params else [None]
            for m in owners:
                for group, filt in self._cells():
                    dims.append(Dim(m, p.name, group, filt, float(lo), float(hi), float(start)))
        if not dims:
            raise EvomergeError(f"the search space of {method} has no dimensions", "search at least one parameter")
        self.dims = dims

    def _cells(self) -> list[tuple[str, str | None]]:
        groups = ["all"] if self.granularity == "model" else [f"layers {a}-{b - 1}" for a, b in self.layer_groups]
        cells = [(g, f) for g in groups for f in [*self.filters, None]]
        if self.embed_head:
            cells = [("embed", None), ("head", None), *cells]
        return cells


    def reach(self) -> list[str]:
        """What the space can and cannot reach, in words (printed when a search starts)."""
        n = self.num_layers
        if self.granularity == "model":
            lines = [f"granularity model: one value per model for all {n} blocks, embeddings and head"]
        else:
            k = len(self.layer_groups)
            per = "each block" if self.granularity == "layer" else f"every {self.granularity} blocks"
            lines = [f"granularity {self.granularity}: {k} layer group(s) ({per}) of {n} blocks"]
            if self.embed_head:
                lines.append("embeddings and final norm/head: groups of their own")
            else:
                lines.append("embeddings and final norm/head follow layer group 0 (set space.embed_head: true "
                             "to search them apart)")
        if self.filters:
            lines.append(f"filters {', '.join(self.filters)}: own values; every other tensor shares one")
        searched = ", ".join(f"{s} {self.dims[[d.param for d in self.dims].index(s)].lower:g}.."
                             f"{self.dims[[d.param for d in self.dims].index(s)].upper:g}" for s in self.search)
        lines.append(f"searched: {searched} for {', '.join(self.inputs)} ({self.dim} dimensions)")
        norm = self.method.param("normalize")
        if norm is not None and "weight" in self.search:
            on = self.fixed.get("normalize", norm.default)
            if on:
                lines.append("normalize: true: weights are divided by their sum, so only their ratios count and "
                             "no model's task vector can be scaled above its own size (set space.fixed.normalize: "
                             "false to let weights amplify)")
            else:
                lines.append("normalize: false: weights scale the task vectors as given")
        if self.fixed:
            lines.append("fixed: " + ", ".join(f"{k}={v}" for k, v in self.fixed.items()))
        return lines

    def _setting(self, values: dict[tuple[str, str | None], float]) -> Any:
        """The mergekit-style setting for one (model, parameter) from its cell values."""
        def layer_list(filt: str | None) -> Any:
            if self.granularity == "model":
                return values[("all", filt)]
            out: list[float] = []
            for a, b in self.layer_groups:
                out += [values[(f"layers {a}-{b - 1}", filt)]] * (b - a)
            return out if len(set(out)) > 1 else out[0]

        rules: list[dict[str, Any]] = []
        if self.embed_head:
            rules += [{"filter": f, "value": values[("embed", None)]} for f in EMBED_FILTERS]
            rules += [{"filter": f, "value": values[("head", None)]} for f in HEAD_FILTERS]
        rules += [{"filter": f, "value": layer_list(f)} for f in self.filters]
        if not rules:
            return layer_list(None)
        rules.append({"value": layer_list(None)})
        return rules

    def to_recipe(self, x: np.ndarray | list[float]) -> Recipe:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise ValueError(f"vector has shape {x.shape}, the space has {self.dim} dimensions")
        cells: dict[tuple[str | None, str], dict[tuple[str, str | None], float]] = {}
        for d, v in zip(self.dims, x, strict=True):
            v = float(min(d.upper, max(d.lower, v)))
            cells.setdefault((d.model, d.param), {})[(d.group, d.filter)] = round(v, 6)
        model_params: dict[str, dict[str, Any]] = {m: {} for m in self.models}
        global_params: dict[str, Any] = {}
        for (m, p), vals in cells.items():
            (model_params[m] if m is not None else global_params)[p] = self._setting(vals)
        for p, v in self.fixed.items():
            if self.method.param(p) in self.method.global_params:
                global_params[p] = v
            else:
                for m in self.inputs:
                    model_params[m].setdefault(p, v)
        models = {m: ModelSpec(path=path, parameters=model_params[m]) for m, path in self.models.items()}
        return Recipe(method=self.method.name, models=models, base=self.base, parameters=global_params,
                      seed=self.seed, dtype=self.dtype)

    def from_recipe(self, recipe: Recipe) -> np.ndarray:
        """The vector of a recipe built on this space's models (e.g. a known good merge to seed a search)."""
        from evomerge.merge.plan import resolve_params

        x = np.empty(self.dim)
        for i, d in enumerate(self.dims):
            if d.group == "embed":
                tensor = "model.embed_tokens.weight"
            elif d.group == "head":
                tensor = "lm_head.weight"
            else:
                layer = 0 if d.group == "all" else int(d.group.split()[1].split("-")[0])
                tensor = f"model.layers.{layer}.{d.filter or 'other'}.weight"
            gp, tps = resolve_params(recipe, self.method, tensor, self.num_layers, self.inputs)
            x[i] = gp[d.param] if d.model is None else tps[self.inputs.index(d.model)][d.param]
        return x


class MethodChoiceSpace(_Dims):
    """The merge method itself as a searched choice, so a user need not guess TIES vs DARE vs SLERP up front.

    Dimension 0 picks the method: its range [0, 1] is cut into one equal bin per method (a plain vector
    optimizer such as pycma moves through the bins; Optuna's TPE and random samplers see a categorical,
    see `categorical`). The other dimensions are every method's own space side by side; a vector's recipe
    uses only its method's block, the other blocks are ignored (and carried along by the optimizer).
    """

    def __init__(self, spaces: list[ParameterSpace]):
        names = [s.method.name for s in spaces]
        if len(spaces) < 2 or len(set(names)) != len(names):
            raise EvomergeError(f"space.method lists {names}: a searched method needs two or more different "
                                "methods", "list each method once, or give a single method")
        self.spaces = spaces
        k = len(spaces)
        choice = Dim(None, "method", "choice", None, 0.0, 1.0, (k // 2 + 0.5) / k)  # the middle method
        self.dims = [choice, *[d for s in spaces for d in s.dims]]
        self.offsets: list[int] = []
        at = 1
        for s in spaces:
            self.offsets.append(at)
            at += s.dim

    @property
    def categorical(self) -> dict[int, int]:
        return {0: len(self.spaces)}


    def reach(self) -> list[str]:
        lines = [f"method: one of {', '.join(s.method.name for s in self.spaces)} (a searched choice)"]
        for s in self.spaces:
            lines += [f"{s.method.name}: {line}" for line in s.reach()]
        return lines

    def choose(self, gene: float) -> int:
        k = len(self.spaces)
        return min(k - 1, max(0, int(float(gene) * k)))

    def to_recipe(self, x: np.ndarray | list[float]) -> Recipe:
        x = np.asarray(x, dtype=float)
        if x.shape != (self.dim,):
            raise ValueError(f"vector has shape {x.shape}, the space has {self.dim} dimensions")
        i = self.choose(x[0])
        return self.spaces[i].to_recipe(x[self.offsets[i]:self.offsets[i] + self.spaces[i].dim])

    def from_recipe(self, recipe: Recipe) -> np.ndarray:
        """The vector of a recipe of one of the methods (the other methods' blocks at their starts)."""
        names = [s.method.name for s in self.spaces]
        if recipe.method not in names:
            raise EvomergeError(f"recipe method {recipe.method} is not among the searched methods {names}")
        i = names.index(recipe.method)
        x = np.asarray(self.x0, dtype=float)
        x[0] = (i + 0.5) / len(self.spaces)
        x[self.offsets[i]:self.offsets[i] + self.spaces[i].dim] = self.spaces[i].from_recipe(recipe)
        return x
