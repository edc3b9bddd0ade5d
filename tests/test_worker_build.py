"""Workers build candidate after candidate into one resident model."""

import torch

from evomerge.merge.build import iter_merged
from evomerge.merge.load import parse_recipe
from evomerge.merge.plan import make_plan
from workers.build import CandidateBuilder


def recipe(family, w1, w2, method="dare_ties"):
    return parse_recipe({"method": method, "base": "base", "models": {
        "base": {"path": str(family["base"])},
        "expert1": {"path": str(family["expert1"]), "parameters": {"weight": w1, "density": 0.5}},
        "expert2": {"path": str(family["expert2"]), "parameters": {"weight": w2, "density": 0.5}}}})


def test_successive_candidates_in_one_resident_model(family):
    b = CandidateBuilder({n: family[n] for n in ("base", "expert1", "expert2")})
    ids = torch.tensor([[1, 4, 8, 15]])
    outs = []
    for w1, w2 in [(0.2, 0.9), (0.7, 0.1), (0.2, 0.9)]:
        r = recipe(family, w1, w2)
        model = b.build(r)
        expected = dict(iter_merged(make_plan(r)))
        name = "model.layers.2.self_attn.o_proj.weight"
        torch.testing.assert_close(model.state_dict()[name], expected[name], atol=0, rtol=0)
        with torch.no_grad():
            outs.append(model(ids).logits.clone())
    assert model is b.model and b.builds == 3
    assert not torch.allclose(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2], atol=0, rtol=0)  # same recipe, same model


def test_worker_refuses_models_it_did_not_load(family, tmp_path):
    import pytest

    from evomerge.errors import EvomergeError

    b = CandidateBuilder({n: family[n] for n in ("base", "expert1")})
    with pytest.raises(EvomergeError, match="did not load"):
        b.build(recipe(family, 0.5, 0.5))


def test_device_resident_sources_build_the_same_model_as_streamed_ones(family):
    from evomerge.merge.source_model import ResidentSource, place_sources, source_bytes
    from evomerge.merge.sources import open_source

    names = ("base", "expert1", "expert2")
    streamed = CandidateBuilder({n: family[n] for n in names}, device_sources="never")
    resident = CandidateBuilder({n: family[n] for n in names}, device_sources="always")
    assert resident.on_device == list(names) and streamed.on_device == []
    assert all(isinstance(s, ResidentSource) for s in resident.sources.values())
    r = recipe(family, 0.4, 0.8)
    a, b = streamed.build(r).state_dict(), resident.build(r).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a budget places the sources that fit, in order, and streams the rest
    opened = {n: open_source(n, family[n]) for n in names}
    one = source_bytes(opened["base"])
    _, placed = place_sources(opened, "cpu", "always", budget_bytes=int(one * 1.5))
    assert placed == ["base"]
