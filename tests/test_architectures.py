"""Each supported architecture: build tiny random models offline, merge, reload, run."""

import pytest
import torch

from evomerge.merge.build import build_into
from evomerge.merge.export.model_dir import write_model_dir
from evomerge.merge.load import parse_recipe
from evomerge.merge.plan import make_plan
from evomerge.zoo.tiny import ARCHS, make_family


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_each_architecture(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    fam = make_family(tmp_path / "fam", arch, n_experts=2, hidden=64, layers=2)
    recipe = parse_recipe({
        "method": "ties", "base": "base",
        "models": {"base": {"path": str(fam["base"])},
                   "e1": {"path": str(fam["expert1"]), "parameters": {"weight": 0.6, "density": 0.5}},
                   "e2": {"path": str(fam["expert2"]), "parameters": {"weight": 0.4, "density": 0.5}}}})
    plan = make_plan(recipe)
    out = write_model_dir(plan, tmp_path / "out")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(merged).__name__.lower().startswith(arch.replace("2", "").replace("3", "")[:4])
    ids = torch.tensor([[1, 7, 9, 11]])
    logits = merged(ids).logits
    assert torch.isfinite(logits).all()
    # the same candidate built in place into a resident model gives the same outputs
    resident = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=torch.float32)
    build_into(plan, dict(resident.state_dict()))
    torch.testing.assert_close(resident(ids).logits, logits, atol=1e-5, rtol=0)
    # and differs from each source
    for name in ("base", "expert1"):
        src = AutoModelForCausalLM.from_pretrained(fam[name], dtype=torch.float32)
        assert not torch.allclose(src(ids).logits, logits)
