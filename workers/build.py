"""A worker's candidate builder: sources opened once, one resident model, every candidate built in place.

    builder = CandidateBuilder(sources={"base": "...", "math": "...", "jp": "..."})
    model = builder.build(recipe)   # the resident model, now holding the candidate's weights

No disk round trip and no new full-size allocations per candidate: each tensor is merged from the
memory-mapped sources straight into the resident parameter.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.merge.build import build_into
from evomerge.merge.plan import make_plan
from evomerge.merge.recipe import Recipe
from evomerge.merge.source_model import SourceModel, place_sources
from evomerge.merge.sources import model_key, open_source


class CandidateBuilder:
    def __init__(self, sources: dict[str, str | Path], resident_from: str | None = None, device: str = "cpu",
                 dtype: str = "float32", trust_remote_code: bool = False, device_sources: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM

        opened = {n: open_source(n, p) for n, p in sources.items()}
        first = resident_from or next(iter(opened))
        self.model = AutoModelForCausalLM.from_pretrained(
            opened[first].path, dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code
        ).to(device)
        self.model.eval()
        # on a GPU, sources that fit stay in GPU memory (after the resident model); the rest stream per tensor
        self.sources: dict[str, SourceModel]
        self.sources, self.on_device = place_sources(opened, device, device_sources)
        self.params = dict(self.model.state_dict())
        self.builds = 0

    def build(self, recipe: Recipe):
        """Build `recipe` into the resident model and return it."""
        for name, spec in recipe.models.items():
            src = self.sources.get(name)
            if src is None or model_key(spec.path) != src.ref:
                raise EvomergeError(f"candidate names model '{name}' at {spec.path}, which this worker did not load",
                                    f"workers hold: {', '.join(f'{n}={s.path}' for n, s in self.sources.items())}")
        plan = make_plan(recipe, sources={n: self.sources[n] for n in recipe.models})
        build_into(plan, self.params)
        self.builds += 1
        return self.model

    def build_piecewise(self, recipe):
        """Build an M2N2 member (evomerge.merge.piecewise.PiecewiseRecipe) into the resident model."""
        import torch

        from evomerge.merge.piecewise import build_pieces, make_layout

        seeds = []
        for name, spec in recipe.ordered_models():
            src = self.sources.get(name)
            if src is None or model_key(spec.path) != src.ref:
                raise EvomergeError(f"candidate names model '{name}' at {spec.path}, which this worker did not load",
                                    f"workers hold: {', '.join(f'{n}={s.path}' for n, s in self.sources.items())}")
            seeds.append(src)
        key = (tuple(recipe.seeds), recipe.blocks)
        if getattr(self, "_layout_key", None) != key:
            self._layout, self._layout_key = make_layout(seeds[0], recipe.blocks), key
        x = recipe.as_pieces()
        with torch.no_grad():
            for name in self._layout.names:
                dest = self.params[name]
                tmp = torch.empty(dest.shape, dtype=torch.float32)
                dest.copy_(build_pieces(x, self._layout, seeds, name, tmp))
        self.builds += 1
        return self.model

    def close(self) -> None:
        for s in self.sources.values():
            s.close()
