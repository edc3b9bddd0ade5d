"""The merge engine on CUDA gives the CPU's numbers (skipped on machines without a GPU)."""

import pytest
import torch

from evomerge.merge.build import build_into, iter_merged
from evomerge.merge.load import parse_recipe
from evomerge.merge.plan import make_plan

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "slerp", "model_stock"])
def test_cuda_build_matches_cpu(family, method):
    from transformers import AutoModelForCausalLM

    models = {"base": {"path": str(family["base"])}}
    n = 1 if method == "slerp" else 3
    for k in range(1, n + 1):
        params = {} if method in ("slerp", "model_stock") else {"weight": 0.5, "density": 0.6}
        models[f"expert{k}"] = {"path": str(family[f"expert{k}"]), "parameters": params}
    extra = {"parameters": {"t": 0.3}} if method == "slerp" else {}
    plan = make_plan(parse_recipe({"method": method, "base": "base", "models": models, **extra}))
    cpu = dict(iter_merged(plan))
    resident = AutoModelForCausalLM.from_pretrained(family["base"], dtype=torch.float32).to("cuda")
    build_into(plan, dict(resident.state_dict()))
    for name, t in cpu.items():
        torch.testing.assert_close(resident.state_dict()[name].cpu(), t, atol=1e-5, rtol=1e-5)


def test_worker_on_cuda_keeps_sources_on_the_gpu_and_matches_cpu(family):
    from workers.build import CandidateBuilder

    names = ("base", "expert1", "expert2")
    models = {n: family[n] for n in names}
    r = parse_recipe({"method": "dare_ties", "base": "base", "models": {
        "base": {"path": str(family["base"])},
        **{n: {"path": str(family[n]), "parameters": {"weight": 0.6, "density": 0.5}} for n in names[1:]}}})
    gpu = CandidateBuilder(models, device="cuda")  # auto: tiny sources fit in GPU memory
    assert gpu.on_device == list(names)
    streamed = CandidateBuilder(models, device="cuda", device_sources="never")
    cpu = CandidateBuilder(models).build(r).state_dict()
    for b in (gpu, streamed):
        got = b.build(r).state_dict()
        for k, t in cpu.items():
            torch.testing.assert_close(got[k].cpu(), t, atol=1e-5, rtol=1e-5)
