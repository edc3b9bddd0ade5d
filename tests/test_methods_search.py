"""Every registered merge method through a search space, the plan and a build (one block size: the
per-method reference tests in test_methods*.py cover the block sizes)."""

import numpy as np
import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods import get_method, method_names


@pytest.mark.parametrize("name", method_names())
def test_every_method_searchable_and_builds(family, name):
    from evomerge.merge.build import iter_merged
    from evomerge.merge.plan import make_plan
    from evomerge.search.space import ParameterSpace

    m = get_method(name)
    experts = ["expert1", "expert2", "expert3"]
    if m.max_inputs == 1:
        experts = experts[:1]
    elif m.max_inputs == 2:
        experts = experts[:2]
    models = {n: str(family[n]) for n in ["base", *experts]}
    if m.name == "linear":
        models.pop("base")
    base = "base" if "base" in models and (m.needs_base or m.optional_base) else None
    floats = [p.name for p in m.tensor_params + m.global_params if p.kind == "float" and p.search]
    default = [p.name for p in m.tensor_params + m.global_params if p.searched_by_default]
    if not default:
        with pytest.raises(EvomergeError, match="no dimensions"):
            ParameterSpace(method=name, models=models, base=base, num_layers=3)
    if not floats:
        assert name in ("model_stock", "arcee_fusion")  # nothing numeric to search
        recipes = [_family_recipe(name, models, base)]
    else:
        space = ParameterSpace(method=name, models=models, base=base, num_layers=3, granularity="layer",
                               search=floats, seed=3)
        rng = np.random.default_rng(0)
        recipes = [space.to_recipe(rng.uniform(space.lower, space.upper)) for _ in range(2)]
        if m.extra_check is not None:  # della's density - epsilon > 0 and density + epsilon < 1
            recipes = [space.to_recipe([0.5 if d.param == "density" else 0.1 if d.param == "epsilon" else
                                        (d.lower + d.upper) / 2 for d in space.dims])]
    for recipe in recipes:
        recipe.validate_semantics()
        plan = make_plan(recipe)
        try:
            out = dict(iter_merged(plan, threads=1))
        finally:
            plan.close()
        assert len(out) == len(plan.jobs)
        assert all(torch.isfinite(t).all() for t in out.values())


def _family_recipe(name, models, base):
    from evomerge.merge.recipe import ModelSpec, Recipe

    return Recipe(method=name, models={n: ModelSpec(path=p) for n, p in models.items()}, base=base)
