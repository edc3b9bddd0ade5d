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

from evomerge.errors import EvomergeError
from evomerge.merge.recipe import ModelSpec, Recipe, SliceSpec
from evomerge.merge.sources import HUB_PREFIX

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


# Every parameter some mergekit (0.1.5) merge method declares. A config may set any of them under any method:
# mergekit reads the ones its method declares and ignores the rest without a word (model cards carry `weight`
# under model_stock or arcee_fusion, `rescale`/`lambda` under sce, `normalize` under multislerp), so the merge
# is the same without them. evomerge accepts them too, with a warning, and drops them. A name no mergekit
# method declares is left to the recipe check, which refuses it naming the nearest parameter (a typo, most
# likely; mergekit would ignore it silently).
MERGEKIT_PARAMETERS = frozenset({
    "weight", "density", "gamma", "epsilon", "lambda", "normalize", "rescale", "int8_mask", "t", "filter_wise",
    "select_topk", "nuslerp_flatten", "nuslerp_row_wise", "normalize_weights", "eps", "max_iter", "tol", "r",
    "alpha", "scale"})
_TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
# chat templates mergekit knows by name that evomerge can write without a download (mergekit/_data/chat_templates)
CHAT_TEMPLATES = {
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{% endif %}",
}


def _warn(message: str) -> None:
    from evomerge.errors import warn

    warn(message)


def _nearest(key: str, known: set[str]) -> str:
    import difflib

    hint = difflib.get_close_matches(key, sorted(known), n=1)
    return f" (did you mean '{hint[0]}'?)" if hint else ""


def _method_params(method: str) -> dict[str, Any] | None:
    from evomerge.merge.methods import get_method

    try:
        m = get_method(method)
    except EvomergeError:
        return None  # an unknown method is reported by the recipe check
    return {p.name: p for p in m.tensor_params + m.global_params}


def _drop_ignored(params: Any, method: str, where: str, source: str) -> Any:
    """A mergekit parameters block as evomerge reads it: parameters the method does not read dropped with a
    warning (see MERGEKIT_PARAMETERS), and 0/1 given for a true/false parameter read as false/true, as mergekit
    (pydantic) reads them (mergekit-evolve writes `normalize: 1.0`)."""
    own = _method_params(method)
    if not isinstance(params, dict) or own is None:
        return params
    ignored = {k for k in params if k in MERGEKIT_PARAMETERS and k not in own}
    for k in sorted(ignored):
        _warn(f"{source}: {where}.{k} is ignored by {method} (mergekit accepts it and does not use it); evomerge "
              "ignores it too")
    out = {}
    for k, v in params.items():
        if k in ignored:
            continue
        if (k in own and own[k].kind == "bool" and not isinstance(v, bool) and isinstance(v, (int, float))
                and v in (0, 1)):
            v = bool(v)
        out[k] = v
    return out


def _chat_template(v: Any, source: str) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or not v.strip():
        raise EvomergeError(f"{source}: chat_template must be a template name or a Jinja template string, got {v!r}",
                            f"use one of {', '.join(sorted(CHAT_TEMPLATES))}, or a template string")
    if "{{" in v or "{%" in v:
        return v
    if v in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[v]
    _warn(f"{source}: chat_template '{v}' is ignored: evomerge writes a Jinja template string or one of "
          f"{', '.join(sorted(CHAT_TEMPLATES))}; the output keeps its tokenizer's own chat template")
    return None


def _tokenizer_block(data: dict[str, Any], source: str) -> Any:
    """mergekit's `tokenizer:` block -> a tokenizer_source: `source` is honoured (base, union or a model),
    `tokens` and `pad_to_multiple_of` are accepted with a warning that evomerge ignores them."""
    tok = data.get("tokenizer")
    if tok is None:
        return data.get("tokenizer_source")
    if not isinstance(tok, dict):
        raise EvomergeError(f"{source}: `tokenizer:` must be a mapping (source, tokens, pad_to_multiple_of)",
                            "write e.g. `tokenizer: {source: base}`")
    if data.get("tokenizer_source") is not None:
        raise EvomergeError(f"{source}: both `tokenizer_source:` and `tokenizer:` are given (mergekit refuses that "
                            "too)", "keep one: `tokenizer: {source: ...}` or `tokenizer_source: ...`")
    for k in tok:
        if k not in _TOKENIZER_KEYS:
            raise EvomergeError(f"{source}: unknown key tokenizer.{k}{_nearest(str(k), _TOKENIZER_KEYS)}",
                                f"`tokenizer:` takes: {', '.join(sorted(_TOKENIZER_KEYS))}")
    for k, why in (("tokens", "per-token embedding sources"), ("pad_to_multiple_of", "vocabulary padding")):
        if tok.get(k) is not None:
            _warn(f"{source}: tokenizer.{k} ({why}) is ignored: evomerge does not support it; the output's "
                  "embeddings come from the merge" + (" and are not padded" if k == "pad_to_multiple_of" else ""))
    return tok.get("source")


def _single_module(data: dict[str, Any], source: str) -> dict[str, Any]:
    """`modules: {default: {slices|models, parameters}}` -- the one module of a decoder-only model, as mergekit
    writes it -- is the same config with that module's slices or models at the top level (its parameters take
    precedence over the top-level ones, as in mergekit). Other module layouts are refused."""
    modules = data.get("modules")
    if modules is None:
        return data
    how = "write the module's `slices:` or `models:` at the top level (one module, `default`, is read that way)"
    if (not isinstance(modules, dict) or set(modules) != {"default"} or not isinstance(modules["default"], dict)
            or data.get("models") or data.get("slices")):
        raise EvomergeError(f"{source}: multi-module configs are not supported (modules: "
                            f"{sorted(modules) if isinstance(modules, dict) else modules!r})", how)
    mod = modules["default"]
    extra = set(mod) - {"slices", "models", "parameters"}
    if extra:
        raise EvomergeError(f"{source}: unknown key(s) {sorted(extra)} in modules.default", how)
    out = {k: v for k, v in data.items() if k != "modules"}
    out.update({k: mod[k] for k in ("slices", "models") if mod.get(k) is not None})
    if mod.get("parameters"):
        out["parameters"] = {**(data.get("parameters") or {}), **mod["parameters"]}
    return out


def from_mergekit(data: dict[str, Any], source: str = "config") -> Recipe:
    unknown = sorted(set(data) - _KNOWN)
    if unknown:
        def hint(k: Any) -> str:  # a key that belongs one level down: mergekit ignores it up here
            if k in MERGEKIT_PARAMETERS:
                return " (a merge parameter: at the top level mergekit ignores it; it goes under `parameters:`)"
            if k in _TOKENIZER_KEYS - {"source"}:
                return " (a `tokenizer:` setting: at the top level mergekit ignores it)"
            return _nearest(str(k), _KNOWN - {"name"})

        raise EvomergeError(f"{source}: unknown mergekit key(s) " + ", ".join(f"'{k}'{hint(k)}" for k in unknown),
                            f"mergekit configs use: {', '.join(sorted(_KNOWN - {'name'}))}")
    data = _single_module(data, source)
    if not isinstance(data.get("merge_method"), str):
        raise EvomergeError(f"{source}: merge_method must be a method name, got {data.get('merge_method')!r}",
                            "see `evomerge methods`")
    method = data["merge_method"]
    if method == "passthrough":
        return passthrough_to_path(data, source)  # type: ignore[return-value] - a PathRecipe: see any_recipe
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
            entries.append((_model_ref(m["model"], f"models[{i}].model", source),
                            _drop_ignored(m.get("parameters") or {}, method, f"models[{i}].parameters", source)))
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
            if not sl["sources"]:
                raise EvomergeError(f"{source}: slices[{i}] has no sources", "list the models the slice merges")
            srcs, ranges = [], []
            for j, s in enumerate(sl["sources"]):
                if not isinstance(s, dict):
                    raise EvomergeError(f"{source}: slices[{i}].sources[{j}] must be {{model: PATH, layer_range: "
                                        "[start, end], parameters: {...}}", "fix that entry")
                path = _model_ref(s.get("model"), f"slices[{i}].sources[{j}].model", source)
                srcs.append((path, _drop_ignored(s.get("parameters") or {}, method,
                                                 f"slices[{i}].sources[{j}].parameters", source)))
                ranges.append((path, _layer_range(s.get("layer_range"), f"slices[{i}].sources[{j}]", source)))
            lengths = {b - a for _, (a, b) in ranges}
            if len(lengths) != 1:
                raise EvomergeError(
                    f"{source}: slices[{i}] takes different numbers of layers from its models ("
                    + ", ".join(f"[{a}, {b}) from {p}" for p, (a, b) in ranges) + ")",
                    "give every source of a slice a layer_range of the same length (layer i of the slice merges "
                    "layer start + i of every model)")
            by_path = dict(ranges)
            if len(by_path) != len(ranges):
                raise EvomergeError(f"{source}: slices[{i}] lists a model twice", "list each model once per slice")
            lr = by_path.get(base_path, ranges[0][1])
            slices_raw.append((lr, _drop_ignored(sl.get("parameters") or {}, method, f"slices[{i}].parameters",
                                                 source), srcs, by_path))
            paths += [p for p, _ in srcs]
        sets = [sorted({p for p, _ in s}) for _, _, s, _ in slices_raw]
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
                                 models={names[p]: dict(pp) for p, pp in srcs if pp},
                                 ranges={names[p]: r for p, r in by_path.items() if r != lr})
                       for lr, sp, srcs, by_path in slices_raw)
    tok = raw_tok = _tokenizer_block(data, source)
    if tok not in (None, "base", "union"):
        tok = names.get(_model_ref(tok, "tokenizer_source", source)) if isinstance(tok, str) else None
        if tok is None:
            key = "tokenizer.source" if data.get("tokenizer") is not None else "tokenizer_source"
            raise EvomergeError(f"{source}: {key} '{raw_tok}' is not one of the models",
                                "use 'base', 'union' or the path of a listed model")
    return Recipe(method=method, models=models, base=names[base_path] if base_path else None,
                  parameters=_drop_ignored(dict(data.get("parameters") or {}), method, "parameters", source),
                  slices=slices, dtype=_dtype(data.get("dtype"), "dtype", source),
                  out_dtype=_dtype(data.get("out_dtype"), "out_dtype", source), tokenizer_source=tok,
                  chat_template=_chat_template(data.get("chat_template"), source))


def _layer_range(value: Any, where: str, source: str) -> tuple[int, int]:
    """A source's `layer_range: [start, end)`, checked."""
    lr = tuple(value) if isinstance(value, (list, tuple)) else ()
    if len(lr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr):
        raise EvomergeError(f"{source}: {where} layer_range must be [start, end] (two layer numbers), got {value!r}",
                            "write e.g. `layer_range: [0, 16]`")
    if lr[0] < 0 or lr[1] <= lr[0]:
        raise EvomergeError(f"{source}: {where} layer_range {list(lr)} is empty or reversed: it must be "
                            "[start, end) with 0 <= start < end",
                            f"write `layer_range: [{min(lr)}, {max(lr) if lr[0] != lr[1] else lr[0] + 1}]`")
    return lr  # type: ignore[return-value]


def passthrough_to_path(data: dict[str, Any], source: str = "config"):
    """A mergekit passthrough (layer-stacking) config as the data-flow recipe that builds the same model: each
    slice's layers in order, one hop per layer; model A (embeddings, tokenizer) is the first slice's model, and
    the final norm and LM head come from the last slice's model (the recipe's `tail` when it is another model),
    as mergekit does (mergekit/plan.py: pre_weights from slices[0], post_weights from slices[-1]). Slices with
    more than one source, or with parameters (mergekit's `scale`), are refused: evomerge's path scales are not
    mergekit's per-tensor filters."""
    from evomerge.merge.dataflow import Hop, PathRecipe

    how = ("write one source per slice, without parameters; or build it with mergekit (evomerge's data-flow "
           "search writes such configs)")
    slices = data.get("slices")
    if not isinstance(slices, list) or not slices or data.get("models"):
        raise EvomergeError(f"{source}: a passthrough config must list `slices:` (one source each), not `models:`",
                            how)
    hops: list[tuple[str, int]] = []
    for i, sl in enumerate(slices):
        srcs = sl.get("sources") if isinstance(sl, dict) else None
        if not isinstance(srcs, list) or len(srcs) != 1 or not isinstance(srcs[0], dict):
            raise EvomergeError(f"{source}: passthrough slices[{i}] must have exactly one source", how)
        src = srcs[0]
        if src.get("parameters") or sl.get("parameters") or data.get("parameters"):
            raise EvomergeError(f"{source}: passthrough slices[{i}] sets parameters (e.g. `scale`), which evomerge "
                                "cannot build as mergekit does", how)
        unknown = set(src) - {"model", "layer_range", "parameters"}
        if unknown:
            raise EvomergeError(f"{source}: passthrough slices[{i}].sources[0] has unknown key(s) {sorted(unknown)}",
                                "a source takes model and layer_range")
        lr = _layer_range(src.get("layer_range"), f"passthrough slices[{i}]", source)
        model = _model_ref(src.get("model"), f"slices[{i}].sources[0].model", source)
        hops += [(model, layer) for layer in range(lr[0], lr[1])]
    first, last = hops[0][0], hops[-1][0]
    names = _names_for(list(dict.fromkeys(m for m, _ in hops)))
    head = names[first]
    tail = names[last] if last != first else None  # mergekit: final norm and head from the last slice's model
    if data.get("base_model") and _model_ref(data["base_model"], "base_model", source) != hops[0][0]:
        raise EvomergeError(f"{source}: passthrough base_model is not the first slice's model (the embeddings and "
                            "tokenizer come from the first slice's model)",
                            "leave base_model out, or make it the first slice's model")
    if data.get("tokenizer") is not None or data.get("tokenizer_source") not in (None, "base"):
        _warn(f"{source}: the tokenizer settings of a passthrough config are ignored: the output takes the first "
              "slice's model's tokenizer")
    if data.get("chat_template") is not None:
        _warn(f"{source}: chat_template is ignored for a passthrough config")
    return PathRecipe(head=head, models={n: ModelSpec(path=p) for p, n in names.items()},
                      path=tuple(Hop(model=names[m], layer=layer) for m, layer in hops),
                      dtype=_dtype(data.get("dtype"), "dtype", source), tail=tail)


