"""A merge recipe is data: which models, which base, which method, and its parameters per tensor.

Recipes are frozen, serialise to and from human-readable YAML, and have a stable content hash. They
carry mergekit's parameter semantics (see `evomerge.merge.settings`), so every recipe converts to a mergekit
merge config that mergekit builds into the same weights, and most mergekit configs convert to a recipe.

    method: ties
    base: base
    models:
      base: {path: zoo/models/base}
      math: {path: zoo/models/arith, parameters: {weight: 0.6, density: 0.5}}
      lang: {path: zoo/models/lang,  parameters: {weight: [0.3, 0.5, 0.7], density: 0.5}}
    parameters: {normalize: true}
    dtype: float32
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from evomerge.errors import EvomergeError
from evomerge.merge.settings import check_setting_shape

DTYPES = ("float32", "bfloat16", "float16")


class ModelSpec(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str
    parameters: dict[str, Any] = {}


class SliceSpec(BaseModel):
    """A contiguous range of layers [start, end) with its own parameters (mergekit's `slices`).

    `ranges` holds the models that take a different range of the same length (mergekit's general slice:
    output layer i of the slice merges layer start_m + i of every model m). The output stacks the slices'
    layers in order; slices that tile [0, num_layers) without `ranges` keep every layer where it is."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = {}
    models: dict[str, dict[str, Any]] = {}
    ranges: dict[str, tuple[int, int]] = {}

    @field_validator("layer_range")
    @classmethod
    def _range_ok(cls, v: tuple[int, int]) -> tuple[int, int]:
        if v[0] < 0 or v[1] <= v[0]:
            raise ValueError(f"layer_range {list(v)} must be [start, end) with 0 <= start < end")
        return v

    @model_validator(mode="after")
    def _ranges_ok(self) -> SliceSpec:
        n = self.layer_range[1] - self.layer_range[0]
        for m, (a, b) in self.ranges.items():
            if a < 0 or b <= a:
                raise ValueError(f"model '{m}' layer_range {[a, b]} must be [start, end) with 0 <= start < end")
            if b - a != n:
                raise ValueError(f"model '{m}' takes {b - a} layers ({[a, b]}) but the slice has {n} "
                                 f"({list(self.layer_range)}): every model of a slice gives the same number")
        return self

    def range_of(self, model: str) -> tuple[int, int]:
        """The layers this slice takes from `model`."""
        return self.ranges.get(model, self.layer_range)


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: str
    models: dict[str, ModelSpec]
    base: str | None = None
    parameters: dict[str, Any] = {}
    slices: tuple[SliceSpec, ...] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    chat_template: str | None = None  # a Jinja template written into the output's tokenizer_config.json
    seed: int = 0

    # ---- identity -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude_none=True)
        for key in ("parameters",):
            if not d.get(key):
                d.pop(key, None)
        for m in d["models"].values():
            if not m.get("parameters"):
                m.pop("parameters", None)
        for sl in d.get("slices") or ():
            for key in ("parameters", "models", "ranges"):
                if not sl.get(key):
                    sl.pop(key, None)
        return d

    def content_hash(self) -> str:
        """Stable 16-hex-digit hash of the recipe's content (key order and formatting do not matter)."""
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    # ---- convenience ----------------------------------------------------------------------------
    @property
    def non_base(self) -> list[str]:
        return [n for n in self.models if n != self.base]

    @property
    def tokenizer_model(self) -> str:
        """Name of the model whose tokenizer (and config) the output takes."""
        src = self.tokenizer_source or "base"
        if src in ("base", "union"):  # union: the base's tokenizer with the others' tokens added
            return self.base if self.base is not None else next(iter(self.models))
        return src

    def with_paths(self, mapping: dict[str, str]) -> Recipe:
        models = {n: m.model_copy(update={"path": mapping.get(n, m.path)}) for n, m in self.models.items()}
        return self.model_copy(update={"models": models})

    def validate_semantics(self) -> None:
        """Check everything that can be checked without reading a model (raises EvomergeError)."""
        from evomerge.merge.methods import get_method

        method = get_method(self.method)
        if self.base is not None and self.base not in self.models:
            raise EvomergeError(
                f"recipe: base '{self.base}' is not one of the models {sorted(self.models)}",
                "name the base model under `models:` or set `base:` to one of them",
            )
        for key in ("dtype", "out_dtype"):
            v = getattr(self, key)
            if v is not None and v not in DTYPES:
                raise EvomergeError(f"recipe: {key} '{v}' is not supported", f"use one of {', '.join(DTYPES)}")
        if self.tokenizer_source not in (None, "base", "union") and self.tokenizer_source not in self.models:
            raise EvomergeError(
                f"recipe: tokenizer_source '{self.tokenizer_source}' is not 'base', 'union' or a model name",
                f"use 'base', 'union' or one of {sorted(self.models)}",
            )
        for name, spec in self.models.items():
            for p, s in spec.parameters.items():
                _check_shape(s, f"models.{name}.parameters.{p}")
        for p, s in self.parameters.items():
            _check_shape(s, f"parameters.{p}")
        for i, sl in enumerate(self.slices or ()):
            for n in list(sl.models) + list(sl.ranges):
                if n not in self.models:
                    raise EvomergeError(f"recipe: slices[{i}] names unknown model '{n}'",
                                        f"use one of {sorted(self.models)}")
        method.check_recipe(self)


def _check_shape(setting: Any, where: str) -> None:
    try:
        check_setting_shape(setting, where)
    except ValueError as e:
        raise EvomergeError(f"recipe: {e}", "see the parameter forms in docs/recipes.md") from None


def _pydantic_message(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        lines.append(f"  - {loc}: {err['msg']}")
    return "\n".join(lines)
