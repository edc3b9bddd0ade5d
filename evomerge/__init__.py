"""evomerge: evolutionary merge-recipe search for language models.

From Python, use the API module (evomerge/api.py): `from evomerge import api`, then `api.merge`,
`api.merge_into`, `api.search`, `api.resume`, `api.status`, `api.export`, `api.report`, `api.check`,
`api.recipe`, `api.to_mergekit`. Heavy libraries (torch, transformers, ray, lm-eval) are imported lazily by the
modules that need them, so `import evomerge` and the CLI start fast.
"""

from evomerge.errors import EvomergeError

__version__ = "0.1.0"
__all__ = ["EvomergeError", "Recipe", "load_recipe"]


def __getattr__(name: str):
    if name == "Recipe":
        from evomerge.merge.recipe import Recipe

        return Recipe
    if name == "load_recipe":
        from evomerge.merge.load import load_recipe

        return load_recipe
    raise AttributeError(f"module 'evomerge' has no attribute '{name}'")
