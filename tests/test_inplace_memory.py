"""In-place builds stay within the memory bound: a candidate built into a resident model allocates at
most a few tensors' worth on top of that model, for every method.

Memory is measured from the allocations themselves, not from the process's resident size: torch's CPU
allocations through the profiler's memory events (their running sum in time order gives the peak) and
numpy's through tracemalloc (numpy reports its buffers to it). The sum of the two peaks bounds the peak
of the sum.
"""

import tracemalloc

import pytest
from torch.profiler import ProfilerActivity, profile

from evomerge.merge.build import build_into
from evomerge.merge.load import parse_recipe
from evomerge.merge.methods import get_method, method_names
from evomerge.merge.plan import make_plan

FEW = 4  # "a few tensors": the bound is FEW x the largest tensor, on top of the resident model


@pytest.fixture(scope="module")
def wide_family(tmp_path_factory):
    """Base + 3 experts with MLP tensors of 512 x 1024 (524,288 entries): several blocks per tensor and
    above the exact-selection cutoff, so the streamed paths are the ones measured."""
    from evomerge.zoo.tiny import make_family

    return make_family(tmp_path_factory.mktemp("wide"), "llama", n_experts=3, hidden=512, layers=1)


def mergekit_config(method, family):
    """A mergekit config of `method` over the family (the shapes merge_throughput.py benchmarks)."""
    m = get_method(method)
    base, experts = str(family["base"]), [str(family[f"expert{k}"]) for k in (1, 2, 3)]
    if m.max_inputs is not None:
        experts = experts[: m.max_inputs]
    params = {}
    for p in m.tensor_params:
        if p.name == "weight":
            params["weight"] = 0.3
        elif p.name == "density":
            params["density"] = 0.9 if "breadcrumbs" in method else 0.5
        elif p.name == "epsilon":
            params["epsilon"] = 0.1
    cfg = {"merge_method": method, "dtype": "float32",
           "models": [{"model": e, **({"parameters": dict(params)} if params else {})} for e in experts]}
    if method != "linear" and (m.needs_base or m.optional_base):
        cfg["base_model"] = base
    glob = {}
    for p in m.global_params:
        if p.required:
            glob[p.name] = 0.001 if method == "nearswap" else 0.4
    if method == "sce":
        glob["select_topk"] = 0.5
    if glob:
        cfg["parameters"] = glob
    return cfg


def peak_extra_bytes(fn) -> int:
    """Peak bytes allocated by fn (torch CPU allocations + numpy buffers) above what was held before."""
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        _, np_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    cur = torch_peak = 0
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    for _, b in events:
        cur += b
        torch_peak = max(torch_peak, cur)
    return torch_peak + max(0, np_peak - before)


@pytest.mark.parametrize("method", method_names())
def test_in_place_build_allocates_at_most_a_few_tensors(wide_family, method):
    from transformers import AutoModelForCausalLM

    plan = make_plan(parse_recipe(mergekit_config(method, wide_family)))
    resident = AutoModelForCausalLM.from_pretrained(wide_family["base"])
    params = dict(resident.state_dict())
    largest = max(t.numel() * t.element_size() for t in params.values())
    try:
        build_into(plan, params, threads=1)  # the first candidate sizes the reusable scratch buffers
        ptrs = {k: v.data_ptr() for k, v in params.items()}
        extra = peak_extra_bytes(lambda: build_into(plan, params, threads=1))
    finally:
        plan.close()
    assert {k: v.data_ptr() for k, v in params.items()} == ptrs  # built in place
    assert extra <= FEW * largest, f"{method}: {extra / 2**20:.1f} MiB > {FEW} x {largest / 2**20:.1f} MiB"
