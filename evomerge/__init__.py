"""evomerge: evolutionary merge-recipe search for language models.

Public names are re-exported here; heavy libraries (torch, transformers, ray, lm-eval) are imported lazily
by the modules that need them, so `import evomerge` and the CLI start fast.
"""

from evomerge.errors import EvomergeError
from evomerge.merge.load import load_recipe
from evomerge.merge.recipe import Recipe

__all__ = ["EvomergeError", "Recipe", "load_recipe"]
__version__ = "0.1.0"
