"""The streaming builder: sharded sources, in place and to disk, determinism, and the output directory."""

import json

import pytest
import torch
from safetensors.torch import load_file

from evomerge.merge.build import build_into
from evomerge.merge.export.model_dir import write_model_dir
from evomerge.merge.load import parse_recipe
from evomerge.merge.methods import get_method
from evomerge.merge.plan import make_plan


def recipe_for(family, method="ties", seed=0, **extra):
    models = {"base": {"path": str(family["base"])}}
    for i, name in enumerate(n for n in family if n != "base"):
        params = {"weight": [0.3 + 0.1 * i, 0.6]}
        if any(p.name == "density" for p in get_method(method).tensor_params):
            params["density"] = 0.6
        models[name] = {"path": str(family[name]), "parameters": params}
    return parse_recipe({"method": method, "base": "base", "models": models, "seed": seed, **extra})


def load_dir(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def reference_tensor(plan, job):
    """Merge one tensor straight from fully loaded source state dicts (no memory maps, no `out`)."""
    states = {n: load_dir(s.path) for n, s in plan.sources.items()}
    base = states[plan.recipe.base][job.name]
    return plan.method.run(base, [states[m][job.name] for m in job.inputs], list(job.tensor_params),
                           job.global_params, list(job.seeds))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic"])
def test_to_disk_equals_direct_merge_and_loads(family, tmp_path, method):
    from transformers import AutoModelForCausalLM

    plan = make_plan(recipe_for(family, method))
    out = write_model_dir(plan, tmp_path / "out")
    merged = load_dir(out)
    assert set(merged) == {j.name for j in plan.jobs}
    for job in plan.jobs[:: max(1, len(plan.jobs) // 6)]:
        torch.testing.assert_close(merged[job.name], reference_tensor(plan, job), atol=1e-6, rtol=0)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model(torch.tensor([[1, 5, 6]])).logits.shape == (1, 3, model.config.vocab_size)
    for f in ("config.json", "tokenizer.json", "README.md", "mergekit_config.yml", "evomerge_recipe.yaml"):
        assert (out / f).is_file(), f
    assert "merge_method: " + method in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_in_place_equals_to_disk(family, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = make_plan(recipe_for(family, "ties"))
    out = write_model_dir(plan, tmp_path / "out")
    resident = AutoModelForCausalLM.from_pretrained(family["base"])
    params = dict(resident.state_dict())
    ptrs = {k: v.data_ptr() for k, v in params.items()}
    build_into(plan, params)
    assert {k: v.data_ptr() for k, v in resident.state_dict().items()} == ptrs  # really in place
    disk = load_dir(out)
    for name, t in disk.items():
        torch.testing.assert_close(resident.state_dict()[name], t, atol=0, rtol=0)
    # a second candidate into the same resident model
    plan2 = make_plan(recipe_for(family, "task_arithmetic"))
    build_into(plan2, params)
    name = plan2.jobs[3].name
    torch.testing.assert_close(resident.state_dict()[name], reference_tensor(plan2, plan2.jobs[3]), atol=1e-6, rtol=0)


def test_sharded_sources_and_sharded_output(sharded_family, tmp_path):
    assert (sharded_family["base"] / "model.safetensors.index.json").is_file()
    plan = make_plan(recipe_for(sharded_family, "ties"))
    out = write_model_dir(plan, tmp_path / "out", max_shard_bytes=50_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    merged = load_dir(out)
    job = plan.jobs[len(plan.jobs) // 2]
    torch.testing.assert_close(merged[job.name], reference_tensor(plan, job), atol=1e-6, rtol=0)


def test_random_methods_are_reproducible_and_seeded(family):
    def build(seed):
        plan = make_plan(recipe_for(family, "dare_ties", seed=seed))
        from evomerge.merge.build import iter_merged

        return dict(iter_merged(plan))

    a, b, c = build(0), build(0), build(1)
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(a[name], b[name])
    assert not torch.equal(a[name], c[name])


def test_bf16_output_dtype(family, tmp_path):
    from safetensors import safe_open

    plan = make_plan(recipe_for(family, "ties", out_dtype="bfloat16"))
    out = write_model_dir(plan, tmp_path / "out")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.get_tensor(f.keys()[0]).dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_failure_leaves_nothing_behind(family, tmp_path, monkeypatch):
    import evomerge.merge.export.model_dir as md

    plan = make_plan(recipe_for(family, "ties"))
    calls = {"n": 0}
    real = md.merge_job

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash mid-merge")
        return real(*a, **k)

    monkeypatch.setattr(md, "merge_job", flaky)
    with pytest.raises(RuntimeError):
        write_model_dir(plan, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_stops_the_merge_threads_before_returning(family, tmp_path):
    """A merged tensor that fails the write (NaN) must not leave merge threads running on the sources' memory
    maps: the caller closes them next, and a thread still reading an unmapped file is a segfault (seen in CI)."""
    import threading
    import time

    from evomerge.errors import EvomergeError
    from evomerge.merge.build import ordered_map
    from evomerge.merge.export.files import write_dir

    lock, running, started = threading.Lock(), [0], []

    def fn(i):
        with lock:
            running[0] += 1
            started.append(i)
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return f"t{i}", torch.full((4,), float("nan") if i == 1 else 1.0)

    def tensors():  # as write_model_dir streams them
        merged = ordered_map(fn, range(12), 3)
        for name, t in merged:  # noqa: UP028 - a wrapper generator, as in write_model_dir
            yield name, t

    entries = [(f"t{i}", (4,)) for i in range(12)]
    try:  # while the error propagates (the caller's `finally` closes the sources here)
        write_dir(tmp_path / "out", entries, tensors(), "float32", {}, tokenizer_dir=family["base"],
                  generation_dir=family["base"], files={}, metadata={})
    except EvomergeError as e:
        assert "not finite" in str(e)
        in_flight, n_started = running[0], len(started)
    else:
        raise AssertionError("the NaN tensor was written")
    assert in_flight == 0  # every merge thread had finished when write_dir raised
    time.sleep(0.5)
    assert len(started) == n_started < 12  # and what had not started never will
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("method,extra", [("slerp", {}), ("model_stock", {}),
                                          ("model_stock", {"parameters": {"filter_wise": True}}),
                                          ("nuslerp", {}), ("nuslerp", {"parameters": {"nuslerp_flatten": False}}),
                                          ("ties", {"parameters": {"rescale": True}}),
                                          ("breadcrumbs_ties", {"parameters": {"rescale": True}}),
                                          ("dare_ties", {})])
def test_source_statistics_are_computed_once_per_open_sources_and_change_nothing(family, method, extra,
                                                                                monkeypatch):
    """SLERP's norms/dot product, Model Stock's ratio, NuSLERP's task-vector norms and the magnitude thresholds
    (and L1 norms) of TIES / breadcrumbs at a given density, DARE's L1 norms at a given seed and density, depend on
    the sources alone: a worker that builds many
    candidates from the same open sources computes them once, and every build is bit-identical to a build
    with fresh sources (a resumed run rebuilds candidates in a new process)."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.methods import basic, fused, spherical
    from evomerge.merge.methods import task_arithmetic as ta
    from evomerge.merge.plan import open_sources

    names = [n for n in family if n != "base"][: {"slerp": 1, "nuslerp": 2}.get(method, 3)]
    weighted = method in ("nuslerp", "ties", "breadcrumbs_ties", "dare_ties")

    def recipe(t=None):  # t: SLERP's t, or the models' weights (1 - t, t, 0.7); densities stay as they are
        models = {"base": {"path": str(family["base"])}}
        for i, n in enumerate(names):
            models[n] = {"path": str(family[n])}
            if weighted:
                models[n]["parameters"] = {"weight": (1 - t, t, 0.7)[i]}
                if method != "nuslerp":
                    models[n]["parameters"]["density"] = (0.5, 0.3, 0.8)[i]
        params = {**extra.get("parameters", {}), **({"t": t} if method == "slerp" else {})}
        return parse_recipe({"method": method, "base": "base", "models": models, "parameters": params})

    calls = {"n": 0}
    module, stat_fn = {"slerp": (basic, "slerp_stats"), "model_stock": (basic, "model_stock_ratio"),
                       "nuslerp": (spherical, "nuslerp_stats"),
                       "dare_ties": (fused, "l1_random")}.get(method, (ta, "_top_delta"))
    real = getattr(module, stat_fn)
    monkeypatch.setattr(module, stat_fn, lambda *a, **k: calls.__setitem__("n", calls["n"] + 1) or real(*a, **k))

    resident = AutoModelForCausalLM.from_pretrained(family["base"])
    params = dict(resident.state_dict())
    ts = [0.3, 0.8] if method != "model_stock" else [None]
    fresh = {}
    for t in ts:
        build_into(make_plan(recipe(t)), params, threads=1)  # fresh sources every time: statistics per build
        fresh[t] = {k: v.clone() for k, v in params.items()}
    per_build = calls["n"] // len(fresh)
    assert per_build > 0
    sources = open_sources(recipe(ts[0]))
    calls["n"] = 0
    for t in [*ts, ts[0]]:
        build_into(make_plan(recipe(t), sources=sources), params, threads=2)
        for k, v in fresh[t].items():
            torch.testing.assert_close(params[k], v, atol=0, rtol=0)
    assert calls["n"] == per_build  # the later builds reuse the first one's statistics
    for s in sources.values():
        s.close()
    assert all(not s.stats for s in sources.values())
