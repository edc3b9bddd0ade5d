"""Reading any recipe: an evomerge recipe, a mergekit config, a data-flow path or a piecewise (M2N2) member."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from evomerge.errors import EvomergeError
from evomerge.merge.recipe import Recipe, _pydantic_message
from evomerge.merge.yaml_io import read_yaml


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """A Recipe from a parsed YAML document: an evomerge recipe or a mergekit merge config."""
    if not isinstance(data, dict):
        raise EvomergeError(
            f"{source}: expected a YAML mapping at the top level, got {type(data).__name__}",
            "write a recipe (keys method, models, ...) or a mergekit config (keys merge_method, models, ...)",
        )
    if data.get("method") == "dataflow":
        from evomerge.merge.dataflow import parse_path_recipe

        return parse_path_recipe(data, source)  # type: ignore[return-value] - a PathRecipe: see any_recipe
    if "merge_method" in data:
        from evomerge.merge.mergekit_config import from_mergekit

        recipe = from_mergekit(data, source=source)
    elif "method" in data:
        try:
            recipe = Recipe.model_validate(data)
        except ValidationError as e:
            raise EvomergeError(f"{source}: invalid recipe:\n{_pydantic_message(e)}",
                                "fix the keys named above (docs/recipes.md lists them)") from None
    else:
        raise EvomergeError(
            f"{source}: neither an evomerge recipe (no 'method' key) nor a mergekit config (no 'merge_method')",
            "add `method:` (evomerge) or `merge_method:` (mergekit)",
        )
    recipe.validate_semantics()
    return recipe


def any_recipe(d: dict[str, Any]):
    """A recorded recipe (from a ledger) as a Recipe or, for `method: dataflow`, a PathRecipe."""
    if d.get("method") == "dataflow":
        from evomerge.merge.dataflow import PathRecipe

        return PathRecipe.model_validate(d)
    if d.get("method") == "piecewise":
        from evomerge.merge.piecewise import PiecewiseRecipe

        return PiecewiseRecipe.model_validate(d)
    return Recipe.model_validate(d)


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe or mergekit config from a YAML file (raises EvomergeError on any problem)."""
    return parse_recipe(read_yaml(path), source=str(path))
