"""mergekit merge configs <-> evomerge recipes.

mergekit's YAML (`merge_method`, `base_model`, `models[].parameters`, top-level `parameters`, `slices`,
`dtype`, value lists interpolated over layers, filter rules) is what model cards carry. Both directions
keep the numbers: a recipe converted to mergekit and built by mergekit gives the same weights as
evomerge's build (see benchmarks/mergekit_agreement.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError
from evomerge.recipe import ModelSpec, Recipe, SliceSpec
from evomerge.sources import HUB_PREFIX, is_hub_ref

_KNOWN = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
          "tokenizer_source", "tokenizer", "chat_template", "modules", "name"}
_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
                  "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}


def _dtype(v: Any, key: str, source: str) -> str | None:
    if v is None:
        return None
    if str(v) not in _DTYPE_ALIASES:
        raise EvomergeError(f"{source}: {key} '{v}' is not supported", "use float32, bfloat16 or float16")
    return _DTYPE_ALIASES[str(v)]


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?")


def _model_ref(v: Any, where: str, source: str) -> str:
    if not isinstance(v, str) or not v:
        raise EvomergeError(f"{source}: {where} must be a model path, got {v!r}", "give a model directory")
    if "+" in v and not Path(v).exists():
        raise EvomergeError(f"{source}: {where} '{v}' is a model+LoRA reference, which this version cannot "
                            "read", "merge the adapter into its base first (peft `merge_and_unload`)")
    if _HUB_ID.fullmatch(v) and not Path(v).exists():
        return HUB_PREFIX + v  # mergekit reads ORG/NAME from the hub; evomerge spells that hf:ORG/NAME
    return v


def _mk_ref(path: str) -> str:
    """A model reference as mergekit writes it (hub models as ORG/NAME)."""
    return path[len(HUB_PREFIX):] if is_hub_ref(path) else path


def _names_for(paths: list[str]) -> dict[str, str]:
    """Readable unique names for model paths: the directory name, made unique."""
    names: dict[str, str] = {}
    used: set[str] = set()
    for p in paths:
        if p in names:
            continue
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(p.rstrip("/")).name) or "model"
        name, i = stem, 2
        while name in used:
            name, i = f"{stem}_{i}", i + 1
        used.add(name)
        names[p] = name
    return names


def from_mergekit(data: dict[str, Any], source: str = "config") -> Recipe:
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        raise EvomergeError(f"{source}: unknown mergekit key(s) {unknown}",
                            f"mergekit configs use: {', '.join(sorted(_KNOWN - {'name'}))}")
    for key, why in (("modules", "multi-module configs"), ("tokenizer", "the `tokenizer:` block"),
                     ("chat_template", "`chat_template`")):
        if data.get(key) is not None:
            raise EvomergeError(f"{source}: {why} are not supported yet", f"remove `{key}:`")
    method = data["merge_method"]
    if method == "passthrough":
        raise EvomergeError(f"{source}: passthrough (layer stacking) is a data-flow recipe, not a "
                            "parameter merge", "use a parameter-space method, or the data-flow search")
    if bool(data.get("models")) == bool(data.get("slices")):
        raise EvomergeError(f"{source}: give exactly one of `models:` and `slices:`", "remove one")
    base_path = _model_ref(data["base_model"], "base_model", source) if data.get("base_model") else None

    entries: list[tuple[str, dict[str, Any]]] = []  # (path, parameters) for `models:`
    slices_raw = []
    if data.get("models"):
        if not isinstance(data["models"], list):
            raise EvomergeError(f"{source}: `models` must be a list of {{model: PATH, parameters: {{...}}}}")
        for i, m in enumerate(data["models"]):
            if not isinstance(m, dict) or "model" not in m or set(m) - {"model", "parameters"}:
                raise EvomergeError(f"{source}: models[{i}] must be {{model: PATH, parameters: {{...}}}}",
                                    "fix that entry")
            entries.append((_model_ref(m["model"], f"models[{i}].model", source), m.get("parameters") or {}))
        paths = [p for p, _ in entries]
    else:
        paths = []
        for i, sl in enumerate(data["slices"]):
            if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list):
                raise EvomergeError(f"{source}: slices[{i}] must be {{sources: [...], parameters: ...}}")
            if sl.get("residual_weight") is not None:
                raise EvomergeError(f"{source}: slices[{i}].residual_weight is not supported", "remove it")
            if sl.get("base_model") not in (None, data.get("base_model")):
                raise EvomergeError(f"{source}: slices[{i}] sets its own base_model", "use one base model")
            ranges = {tuple(s.get("layer_range", ())) for s in sl["sources"]}
            if len(ranges) != 1:
                raise EvomergeError(
                    f"{source}: slices[{i}] takes different layer ranges from different models {sorted(ranges)}",
                    "layer-path (frankenmerge) configs are data-flow recipes; a parameter merge takes the "
                    "same layers from every model")
            srcs = []
            for j, s in enumerate(sl["sources"]):
                srcs.append((_model_ref(s.get("model"), f"slices[{i}].sources[{j}].model", source),
                             s.get("parameters") or {}))
            lr = ranges.pop()
            if len(lr) != 2:
                raise EvomergeError(f"{source}: slices[{i}] layer_range must be [start, end]")
            slices_raw.append((lr, sl.get("parameters") or {}, srcs))
            paths += [p for p, _ in srcs]
        sets = [sorted({p for p, _ in s}) for _, _, s in slices_raw]
        if any(s != sets[0] for s in sets):
            raise EvomergeError(f"{source}: every slice must list the same models", "list each model in each slice")
    all_paths = list(dict.fromkeys(paths + ([base_path] if base_path else [])))
    names = _names_for(all_paths)

    models: dict[str, ModelSpec] = {}
    if entries:
        for p, params in entries:
            if names[p] in models:
                raise EvomergeError(f"{source}: model '{p}' is listed twice", "list each model once")
            models[names[p]] = ModelSpec(path=p, parameters=dict(params))
    for p in all_paths:
        models.setdefault(names[p], ModelSpec(path=p))
    slices = None
    if slices_raw:
        slices = tuple(SliceSpec(layer_range=lr, parameters=dict(sp),
                                 models={names[p]: dict(pp) for p, pp in srcs if pp})
                       for lr, sp, srcs in slices_raw)
    tok = data.get("tokenizer_source")
    if tok not in (None, "base", "union"):
        tok = names.get(_model_ref(tok, "tokenizer_source", source))
        if tok is None:
            raise EvomergeError(f"{source}: tokenizer_source '{data['tokenizer_source']}' is not one of the models",
                                "use 'base' or the path of a listed model")
    return Recipe(method=method, models=models, base=names[base_path] if base_path else None,
                  parameters=dict(data.get("parameters") or {}), slices=slices,
                  dtype=_dtype(data.get("dtype"), "dtype", source),
                  out_dtype=_dtype(data.get("out_dtype"), "out_dtype", source), tokenizer_source=tok)


def to_mergekit(recipe: Recipe) -> dict[str, Any]:
    """The mergekit merge config that builds the same weights as `recipe`."""
    from evomerge.methods import get_method

    method = get_method(recipe.method)
    out: dict[str, Any] = {"merge_method": recipe.method}
    if recipe.base is not None:
        out["base_model"] = _mk_ref(recipe.models[recipe.base].path)
    if recipe.slices:
        slices = []
        for sl in recipe.slices:
            sources = []
            for name, spec in recipe.models.items():
                params = {**spec.parameters, **sl.models.get(name, {})}
                src: dict[str, Any] = {"model": _mk_ref(spec.path), "layer_range": list(sl.layer_range)}
                if params:
                    src["parameters"] = params
                sources.append(src)
            entry: dict[str, Any] = {"sources": sources}
            if sl.parameters:
                entry["parameters"] = dict(sl.parameters)
            slices.append(entry)
        out["slices"] = slices
    else:
        models = []
        for name, spec in recipe.models.items():
            if name == recipe.base and method.uses_base(recipe.base) and not spec.parameters:
                continue  # mergekit adds the base itself
            entry = {"model": _mk_ref(spec.path)}
            if spec.parameters:
                entry["parameters"] = dict(spec.parameters)
            models.append(entry)
        out["models"] = models
    if recipe.parameters:
        out["parameters"] = dict(recipe.parameters)
    if recipe.dtype:
        out["dtype"] = recipe.dtype
    if recipe.out_dtype:
        out["out_dtype"] = recipe.out_dtype
    if recipe.tokenizer_source in ("base", "union"):
        out["tokenizer_source"] = recipe.tokenizer_source
    elif recipe.tokenizer_source is not None:
        out["tokenizer_source"] = _mk_ref(recipe.models[recipe.tokenizer_source].path)
    return out


class _FlowListDumper(yaml.SafeDumper):
    pass


def _repr_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _repr_list)
_FlowListDumper.add_representer(tuple, _repr_list)


def mergekit_yaml(recipe: Recipe) -> str:
    return yaml.dump(to_mergekit(recipe), Dumper=_FlowListDumper, sort_keys=False, width=100)
