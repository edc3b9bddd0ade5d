"""A recipe written as the mergekit config that builds the same model (model cards, `evomerge convert`, exports)."""

from __future__ import annotations

from typing import Any

import yaml

from evomerge.merge.recipe import Recipe
from evomerge.merge.sources import HUB_PREFIX, is_hub_ref


def to_mergekit(recipe: Recipe) -> dict[str, Any]:
    """The mergekit merge config that builds the same weights as `recipe`."""
    from evomerge.merge.methods import get_method

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
                src: dict[str, Any] = {"model": _mk_ref(spec.path), "layer_range": list(sl.range_of(name))}
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
    if recipe.chat_template is not None:
        out["chat_template"] = recipe.chat_template
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


def _mk_ref(path: str) -> str:
    """A model reference as mergekit writes it (hub models as ORG/NAME)."""
    return path[len(HUB_PREFIX):] if is_hub_ref(path) else path
