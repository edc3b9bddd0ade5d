"""Merges of a zoo's experts built in place into one resident model, and their scores (no disk writes)."""

from __future__ import annotations

import math
from pathlib import Path

from evomerge.zoo.build import load_zoo, zoo_items


def merge_recipe(zoo_dir: str | Path, method: str, weights: dict[str, float], **params) -> dict:
    """A recipe dict merging the zoo's experts onto its base with `method` and per-expert `weights`.

    Extra keyword arguments are per-expert parameters (e.g. ``density=0.5`` for TIES). ``linear`` merges
    the experts alone (no base).
    """
    models = load_zoo(zoo_dir)["models"]
    recipe_models = {} if method == "linear" else {"base": {"path": models["base"]["path"]}}
    for skill in (n for n, m in models.items() if m.get("skill")):
        recipe_models[skill] = {"path": models[skill]["path"], "parameters": {"weight": weights[skill], **params}}
    recipe = {"method": method, "models": recipe_models}
    if method != "linear":
        recipe["base"] = "base"
    return recipe


class ResidentMerger:
    """Loads the zoo's base once and rebuilds merges into its parameters in place."""

    def __init__(self, zoo_dir: str | Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.zoo_dir = Path(zoo_dir)
        base = load_zoo(zoo_dir)["models"]["base"]["path"]
        self.model = AutoModelForCausalLM.from_pretrained(base, dtype="float32").eval()
        self.tokenizer = AutoTokenizer.from_pretrained(base)
        self.params = dict(self.model.state_dict())

    def load(self, recipe: dict):
        """Build `recipe` into the resident model; returns the model."""
        from evomerge.merge.build import build_into
        from evomerge.merge.load import parse_recipe
        from evomerge.merge.plan import make_plan

        build_into(make_plan(parse_recipe(recipe)), self.params)
        return self.model

    def load_model(self, name: str):
        """Put one of the zoo's own models (base or an expert) into the resident model."""
        from safetensors.torch import load_file

        path = Path(load_zoo(self.zoo_dir)["models"][name]["path"]) / "model.safetensors"
        self.model.load_state_dict(load_file(path))
        return self.model

    def scores(self, task: str, split: str) -> list[int]:
        """Per-item exact match of the resident model on one task/split (the zoo's fast scorer)."""
        from evomerge.zoo.score import score_items

        return score_items(self.model, self.tokenizer, zoo_items(self.zoo_dir, task, split))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half
