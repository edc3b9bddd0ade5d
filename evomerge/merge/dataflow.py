"""Data-flow (layer-path) recipes: which layer of which model runs at each hop, with an input scale.

    method: dataflow
    head: shift                  # model "A": tokenizer, embeddings, final norm and head
    models:
      shift:  {path: zoo/models/shift}
      mirror: {path: zoo/models/mirror}
    path:                        # hop k runs layer `layer` of `model` on its input residual times `scale`
      - {model: shift,  layer: 0, scale: 1.0}
      - {model: mirror, layer: 1, scale: 0.87}
      - {model: shift,  layer: 1, scale: 1.1}

Export uses the identity of pre-norm transformers (shared/reference/algorithms.md): scaling a layer's input
residual h by s gives s*h + f(norm(h)) because the branch norms are scale-invariant, so dividing the stream by
the running product P_k of the scales turns the path into a plain stack of the same layers whose branch
outputs are scaled by 1/P_k; the final norm removes the overall scale. Where a branch ends in a linear map
(Llama, Mistral, Qwen2, Qwen3) that factor folds into o_proj/down_proj (mergekit's passthrough `scale` can
say the same); where it ends in a post-norm (Gemma2: x/rms(x)*(1+w)) it folds into that norm's weight as
c*(1+w)-1, which mergekit cannot express, so a Gemma2 path exports as a model directory but not as a
mergekit config. Other architectures are refused for data-flow merges.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from evomerge.errors import EvomergeError
from evomerge.merge.recipe import DTYPES, ModelSpec
from evomerge.merge.source_model import SourceModel

LAYER_RE = re.compile(r"^(model\.layers\.)(\d+)\.(.+)$")
# how each architecture folds a branch scale c (see the module docstring)
FOLD_LINEAR = ("self_attn.o_proj.weight", "self_attn.o_proj.bias", "mlp.down_proj.weight", "mlp.down_proj.bias")
FOLD_POSTNORM = ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")
ARCH_FOLD = {"llama": "linear", "mistral": "linear", "qwen2": "linear", "qwen3": "linear", "gemma2": "postnorm"}


class Hop(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    model: str
    layer: int = Field(ge=0)
    scale: float = 1.0

    @field_validator("scale")
    @classmethod
    def _finite_positive(cls, v: float) -> float:
        if not math.isfinite(v) or v <= 0:
            raise ValueError(f"scale {v} must be a finite number > 0")
        return v


class PathRecipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["dataflow"] = "dataflow"
    head: str  # model A: tokenizer, embeddings, final norm and LM head
    models: dict[str, ModelSpec]
    path: tuple[Hop, ...]
    dtype: str | None = None
    # the model whose final norm and LM head the output takes, when not model A (a mergekit passthrough config
    # takes them from its last slice's model); None: model A's, as every searched path does
    tail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = self.model_dump(mode="json", exclude_none=True)
        for m in d["models"].values():
            if not m.get("parameters"):
                m.pop("parameters", None)
        return d

    def content_hash(self) -> str:
        canon = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        d = self.to_dict()
        text = yaml.safe_dump({k: v for k, v in d.items() if k != "path"}, sort_keys=False, width=100)
        hops = "".join(f"  - {{model: {h['model']}, layer: {h['layer']}, scale: {h['scale']:.6g}}}\n"
                       for h in d["path"])
        return text + "path:\n" + hops

    def validate_semantics(self) -> None:
        if self.head not in self.models:
            raise EvomergeError(f"dataflow recipe: head '{self.head}' is not one of the models {sorted(self.models)}",
                                "set `head:` to the model that supplies embeddings, final norm and head")
        if self.tail is not None and self.tail not in self.models:
            raise EvomergeError(f"dataflow recipe: tail '{self.tail}' is not one of the models {sorted(self.models)}",
                                "set `tail:` to the model that supplies the final norm and LM head, or leave it out")
        if not self.path:
            raise EvomergeError("dataflow recipe: the path has no layers", "give at least one hop under `path:`")
        for i, h in enumerate(self.path):
            if h.model not in self.models:
                raise EvomergeError(f"dataflow recipe: path[{i}] names unknown model '{h.model}'",
                                    f"use one of {sorted(self.models)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise EvomergeError(f"dataflow recipe: dtype '{self.dtype}' is not supported",
                                f"use one of {', '.join(DTYPES)}")

    def cumulative_scales(self) -> list[float]:
        """P_k: the product of the scales up to and including hop k."""
        out, p = [], 1.0
        for h in self.path:
            p *= h.scale
            out.append(p)
        return out


def parse_path_recipe(data: dict[str, Any], source: str = "recipe") -> PathRecipe:
    try:
        r = PathRecipe.model_validate(data)
    except ValidationError as e:
        lines = [f"  - {'.'.join(str(x) for x in err['loc']) or '(top level)'}: {err['msg']}" for err in e.errors()]
        raise EvomergeError(f"{source}: invalid dataflow recipe:\n" + "\n".join(lines),
                            "fix the keys named above (docs/recipes.md, 'Data-flow recipes')") from None
    r.validate_semantics()
    return r


# ---- checks against the sources ------------------------------------------------------------------------

def layer_tensors(src: SourceModel, layer: int) -> dict[str, str]:
    """{suffix: tensor name} of one decoder layer."""
    out = {}
    for name in src.tensors:
        m = LAYER_RE.match(name)
        if m and int(m.group(2)) == layer:
            out[m.group(3)] = name
    return out


def head_tensors(src: SourceModel) -> list[str]:
    return [n for n in src.tensors if not LAYER_RE.match(n)]


def check_path(recipe: PathRecipe, sources: dict[str, SourceModel]) -> str:
    """Check a path against its sources (layers exist, shapes agree, architecture foldable); the fold kind."""
    head = sources[recipe.head]
    cfg_a = head.config.get("text_config", head.config)
    arch = cfg_a.get("model_type", "?")
    fold = ARCH_FOLD.get(arch)
    if fold is None:
        raise EvomergeError(f"dataflow merges support {', '.join(sorted(ARCH_FOLD))}; model '{recipe.head}' is "
                            f"'{arch}'", "use a parameter-space merge for this architecture")
    ref_layer = layer_tensors(head, 0)
    for name, src in sources.items():
        cfg = src.config.get("text_config", src.config)
        if cfg.get("model_type") != arch:
            raise EvomergeError(f"dataflow: model '{name}' is '{cfg.get('model_type')}', model A "
                                f"('{recipe.head}') is '{arch}'", "path layers must come from one architecture")
        if cfg.get("hidden_size") != cfg_a.get("hidden_size"):
            raise EvomergeError(f"dataflow: model '{name}' has hidden size {cfg.get('hidden_size')}, model A "
                                f"('{recipe.head}') {cfg_a.get('hidden_size')}",
                                "a path can only join layers of the same width (fine-tunes of one base)")
    for i, hop in enumerate(recipe.path):
        src = sources[hop.model]
        n = src.num_layers or 0
        if hop.layer >= n:
            raise EvomergeError(f"dataflow: path[{i}] asks for layer {hop.layer} of '{hop.model}', which has {n}",
                                f"use layers 0..{n - 1}")
        lt = layer_tensors(src, hop.layer)
        if set(lt) != set(ref_layer):
            raise EvomergeError(f"dataflow: layer {hop.layer} of '{hop.model}' has different tensors than the "
                                f"layers of model A", "path layers must have one layout")
        for suffix, tname in lt.items():
            shape, want = src.tensors[tname].shape, head.tensors[ref_layer[suffix]].shape
            if shape != want:
                raise EvomergeError(f"dataflow: {tname} of '{hop.model}' has shape {list(shape)}, model A's "
                                    f"{list(want)}", "path layers must have one shape (fine-tunes of one base)")
    if recipe.tail is not None and recipe.tail != recipe.head:
        tail = sources[recipe.tail]
        for name in (n for n in head_tensors(tail) if "embed" not in n):
            if name not in head.tensors or tail.tensors[name].shape != head.tensors[name].shape:
                raise EvomergeError(f"dataflow: the tail model '{recipe.tail}' has {name} "
                                    f"{list(tail.tensors[name].shape)}, model A "
                                    f"{list(head.tensors[name].shape) if name in head.tensors else 'none'}",
                                    "the final norm and head must fit model A's embeddings (fine-tunes of one base)")
    return fold


def fold(tensor, suffix: str, factor: float, kind: str):
    """The exported tensor for a layer tensor of a hop whose branch outputs are scaled by `factor`."""
    if factor == 1.0:
        return tensor
    if kind == "linear" and suffix in FOLD_LINEAR:
        return tensor * factor
    if kind == "postnorm" and suffix in FOLD_POSTNORM:
        return (tensor + 1.0) * factor - 1.0
    return tensor


def source_layer_types(config: dict[str, Any]) -> list[str] | None:
    """A source's per-layer attention types as transformers reads them: the config's `layer_types`, or,
    where config.json leaves them out (older Gemma 2 / 3 checkpoints), what the config class derives from
    its defaults (e.g. sliding and full attention alternating); None for models without them."""
    text = config.get("text_config", config)
    if isinstance(text.get("layer_types"), list):
        return list(text["layer_types"])
    try:
        from transformers import AutoConfig

        obj = AutoConfig.for_model(**config)
    except Exception:  # noqa: BLE001 - an unknown model type: no derived types
        return None
    obj = obj.get_text_config() if hasattr(obj, "get_text_config") else obj
    types = getattr(obj, "layer_types", None)
    return list(types) if isinstance(types, (list, tuple)) else None


def path_config(recipe: PathRecipe, sources: dict[str, SourceModel], dtype: str) -> dict[str, Any]:
    """Model A's config for a plain stack of len(path) layers (per-hop layer types where the config has them)."""
    cfg = json.loads(json.dumps(sources[recipe.head].config))
    text = cfg.get("text_config", cfg)
    text["num_hidden_layers"] = len(recipe.path)
    types = {n: source_layer_types(sources[n].config) for n in {h.model for h in recipe.path}}
    if any(t is not None for t in types.values()):
        text["layer_types"] = [types[h.model][h.layer] for h in recipe.path]
    cfg["torch_dtype" if "torch_dtype" in cfg and "dtype" not in cfg else "dtype"] = dtype
    return cfg


def path_entries(recipe: PathRecipe, sources: dict[str, SourceModel]) -> list[tuple[str, str, str, float, str]]:
    """(output name, source model, source tensor, fold factor, suffix) for every tensor of the exported model:
    model A's embeddings first, then hop by hop, then the final norm and head (A's, or the tail model's)."""
    head = sources[recipe.head]
    tail = recipe.tail or recipe.head
    pre = [n for n in head_tensors(head) if "embed" in n]
    post = [n for n in head_tensors(sources[tail]) if "embed" not in n]
    out = [(n, recipe.head, n, 1.0, "") for n in pre]
    for k, (hop, p) in enumerate(zip(recipe.path, recipe.cumulative_scales(), strict=True)):
        for suffix, tname in layer_tensors(sources[hop.model], hop.layer).items():
            out.append((f"model.layers.{k}.{suffix}", hop.model, tname, 1.0 / p, suffix))
    out += [(n, tail, n, 1.0, "") for n in post]
    return out


def iter_path_tensors(recipe: PathRecipe, sources: dict[str, SourceModel], kind: str) -> Iterator[tuple[str, Any]]:
    import torch

    for out_name, model, tname, factor, suffix in path_entries(recipe, sources):
        t = sources[model].get(tname).to(torch.float32)
        yield out_name, fold(t, suffix, factor, kind)


def to_mergekit_passthrough(recipe: PathRecipe, kind: str) -> dict[str, Any]:
    """mergekit's passthrough config that builds the same weights (one slice per hop, scale on o_proj and
    down_proj); refused where the fold is not a weight multiplication (Gemma2's post-norms)."""
    if kind != "linear":
        raise EvomergeError("mergekit cannot express this path: its architecture folds input scales into "
                            "post-norm weights as c*(1+w)-1, and mergekit's passthrough scale only multiplies",
                            "use the exported model directory itself")
    from evomerge.merge.sources import is_hub_ref

    def ref(name: str) -> str:
        p = recipe.models[name].path
        return p[3:] if is_hub_ref(p) else p

    tail = recipe.tail or recipe.head
    if recipe.path[0].model != recipe.head or recipe.path[-1].model != tail:
        raise EvomergeError("mergekit cannot express this path: a passthrough config takes the embeddings from its "
                            f"first slice's model and the final norm and head from its last ('{recipe.path[0].model}'"
                            f" and '{recipe.path[-1].model}' here), not from '{recipe.head}' and '{tail}'",
                            "use the exported model directory itself")
    slices = []
    for hop, p in zip(recipe.path, recipe.cumulative_scales(), strict=True):
        src: dict[str, Any] = {"model": ref(hop.model), "layer_range": [hop.layer, hop.layer + 1]}
        if p != 1.0:
            c = float(f"{1.0 / p:.9g}")
            src["parameters"] = {"scale": [{"filter": "o_proj", "value": c}, {"filter": "down_proj", "value": c},
                                           {"value": 1.0}]}
        slices.append({"sources": [src]})
    # no tokenizer_source: mergekit would resize the embeddings to the tokenizer's length; it takes the
    # tokenizer and embeddings from the first slice's model (model A), final norm and head from the last
    return {"merge_method": "passthrough", "slices": slices, "dtype": recipe.dtype or "float32"}


def open_path_sources(recipe: PathRecipe) -> dict[str, SourceModel]:
    from evomerge.merge.sources import open_source

    return {name: open_source(name, spec.path) for name, spec in recipe.models.items()}


