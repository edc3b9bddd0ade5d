"""The one registry of merge methods. Search spaces read each method's parameters from here."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from evomerge.errors import EvomergeError
from evomerge.merge.settings import setting_values

if TYPE_CHECKING:
    from evomerge.merge.recipe import Recipe

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its default (or REQUIRED), valid range and the range a search explores."""

    name: str
    default: Any = REQUIRED
    kind: str = "float"  # float | int | bool
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    search: tuple[float, float] | None = None  # bounds a search explores
    searched_by_default: bool = False
    doc: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def check(self, value: Any, where: str) -> None:
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise EvomergeError(f"{where}: '{self.name}' must be true or false, got {value!r}",
                                    f"write {self.name}: true or {self.name}: false")
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise EvomergeError(f"{where}: '{self.name}' must be a number, got {value!r}",
                                f"write {self.name} as a number (or a list of numbers, or filter rules)")
        if self.kind == "int" and not (math.isfinite(value) and float(value).is_integer()):
            raise EvomergeError(f"{where}: '{self.name}' must be a whole number, got {value!r}")
        too_low = value <= self.low if self.low_open else value < self.low
        if too_low or value > self.high or not math.isfinite(value):
            lo = "(" if self.low_open else "["
            raise EvomergeError(
                f"{where}: {self.name} = {value} is out of range {lo}{self.low}, {self.high}]",
                f"set {self.name} within that range",
            )


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: a pure tensor function plus the description a search space and validator need.

    `run(base, tensors, tensor_params, global_params, seeds, out=None)` merges one tensor: `tensors` and
    `tensor_params` are per non-base input model (in recipe order), `seeds` one int per input for
    methods with random masks. It returns a new float tensor.

    The base: `needs_base` methods require one; `optional_base` methods (nuslerp, multislerp) use it
    when the recipe names one (then the other models are the inputs) and take every model as an input
    otherwise; the rest ignore it (a named base is then just one more input). `uses_base` decides.
    """

    name: str
    run: Callable[..., Any]
    tensor_params: tuple[Param, ...] = ()
    global_params: tuple[Param, ...] = ()
    needs_base: bool = True
    min_inputs: int = 1  # non-base models
    max_inputs: int | None = None
    random: bool = False
    doc: str = ""
    reference: str = ""
    extra_check: Callable[[dict[str, Any], str], None] | None = field(default=None, repr=False)
    optional_base: bool = False
    # `run` also takes `stats`: a dict for this tensor that outlives one build (kept with the open sources), to
    # hold what depends on the source tensors alone (SLERP's norms and dot product, Model Stock's ratio), so a
    # worker building many candidates from the same sources computes it once. Results are the same either way.
    source_stats: bool = False

    def uses_base(self, base: str | None) -> bool:
        """Whether a recipe whose base is `base` (None: no base) merges with a base tensor."""
        return self.needs_base or (self.optional_base and base is not None)

    def param(self, name: str) -> Param | None:
        for p in self.tensor_params + self.global_params:
            if p.name == name:
                return p
        return None

    def check_recipe(self, recipe: Recipe) -> None:
        where = f"recipe (method {self.name})"
        if self.needs_base and recipe.base is None:
            raise EvomergeError(f"{where}: needs a base model", "set `base:` (mergekit: `base_model:`)")
        inputs = recipe.non_base if self.uses_base(recipe.base) else list(recipe.models)
        n = len(inputs)
        if n < self.min_inputs or (self.max_inputs is not None and n > self.max_inputs):
            want = (f"exactly {self.min_inputs}" if self.max_inputs == self.min_inputs
                    else f"at least {self.min_inputs}" if self.max_inputs is None
                    else f"{self.min_inputs} to {self.max_inputs}")
            raise EvomergeError(
                f"{where}: takes {want} model(s) besides the base, got {n} ({', '.join(inputs) or 'none'})",
                "add or remove models under `models:`",
            )
        known = {p.name for p in self.tensor_params + self.global_params}
        blocks: list[tuple[str, dict[str, Any]]] = [("parameters", recipe.parameters)]
        blocks += [(f"models.{m}.parameters", s.parameters) for m, s in recipe.models.items()]
        for i, sl in enumerate(recipe.slices or ()):
            blocks.append((f"slices[{i}].parameters", sl.parameters))
            blocks += [(f"slices[{i}].models.{m}", p) for m, p in sl.models.items()]
        for loc, params in blocks:
            for pname, setting in params.items():
                p = self.param(pname)
                if p is None:
                    hint = difflib.get_close_matches(pname, sorted(known), n=1)
                    raise EvomergeError(
                        f"{where}: unknown parameter '{pname}' in {loc}"
                        + (f" (did you mean '{hint[0]}'?)" if hint else ""),
                        f"{self.name} takes: {', '.join(sorted(known)) or 'no parameters'}",
                    )
                for v in setting_values(setting):
                    p.check(v, f"{where} {loc}")
        for p in self.tensor_params:
            if not p.required:
                continue
            for m in inputs:
                if not _is_set(recipe, m, p.name):
                    raise EvomergeError(
                        f"{where}: model '{m}' has no '{p.name}'",
                        f"set models.{m}.parameters.{p.name} (or a top-level parameters.{p.name})",
                    )
        for p in self.global_params:
            if p.required and p.name not in recipe.parameters and not (
                recipe.slices and all(p.name in sl.parameters for sl in recipe.slices)
            ):
                raise EvomergeError(f"{where}: parameter '{p.name}' is required",
                                    f"set parameters.{p.name}")


def _is_set(recipe: Recipe, model: str, pname: str) -> bool:
    if pname in recipe.parameters or pname in recipe.models[model].parameters:
        return True
    if recipe.slices:
        return all(pname in sl.parameters or pname in sl.models.get(model, {}) for sl in recipe.slices)
    return False


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _REGISTRY:
        raise RuntimeError(f"merge method {method.name} registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(name, sorted(_REGISTRY), n=1)
        raise EvomergeError(
            f"unknown merge method '{name}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""),
            f"known methods: {', '.join(sorted(_REGISTRY))}",
        )
    return _REGISTRY[name]


def method_names() -> list[str]:
    return sorted(_REGISTRY)
