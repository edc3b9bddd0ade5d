"""mergekit's general slices: per-model layer ranges of one length, and slices that restack the layers
(output layer i of a slice merges layer start_m + i of every model m; the output has the slices' layers)."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge.errors import EvomergeError
from evomerge.merge.export.model_dir import write_model_dir
from evomerge.merge.load import load_recipe
from evomerge.merge.mergekit_out import to_mergekit
from evomerge.merge.plan import make_plan


@pytest.fixture(scope="module")
def fam4(tmp_path_factory):
    from evomerge.zoo.tiny import make_family

    return make_family(tmp_path_factory.mktemp("fam4"), "llama", n_experts=2, hidden=32, layers=4)


def states(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def write_cfg(tmp_path, cfg):
    p = tmp_path / "mk.yml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_different_ranges_per_model_merge_those_layers(fam4, tmp_path, capsys):
    a, b = str(fam4["expert1"]), str(fam4["expert2"])
    cfg = {"merge_method": "linear", "parameters": {"weight": 0.8},
           "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [2, 4]}],
                       "parameters": {"weight": [0.9, 0.1]}}]}
    recipe = load_recipe(write_cfg(tmp_path, cfg))
    assert any(sl.ranges for sl in recipe.slices)
    plan = make_plan(recipe)
    assert "stack 2 layers" in capsys.readouterr().err
    out = write_model_dir(plan, tmp_path / "out")
    got, sa, sb = states(out), states(fam4["expert1"]), states(fam4["expert2"])
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert not any(".layers.2." in n or ".layers.3." in n for n in got)
    for i in range(2):
        t = i / 1  # gradient [0.9, 0.1] over the slice's 2 layers: 0.9 at layer 0, 0.1 at layer 1
        w = 0.9 + (0.1 - 0.9) * t
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            want = (w * sa[f"model.layers.{i}.{suffix}"] + w * sb[f"model.layers.{i + 2}.{suffix}"]) / (2 * w)
            torch.testing.assert_close(got[f"model.layers.{i}.{suffix}"], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["model.embed_tokens.weight"],
                               (sa["model.embed_tokens.weight"] + sb["model.embed_tokens.weight"]) / 2)
    # the model loads and runs with its 2 layers
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.num_hidden_layers == 2
    m(torch.tensor([[1, 2, 3]]))
    # written back as mergekit writes it: each model with its own range
    mk = to_mergekit(recipe)
    assert [s["layer_range"] for s in mk["slices"][0]["sources"]] == [[0, 2], [2, 4]]


def test_restacked_slices_of_one_range_each(fam4, tmp_path):
    """Two slices taking the same layers [1, 3) twice: a 4-layer output whose layers 0-1 and 2-3 are the
    merge of source layers 1-2, each with its slice's parameters."""
    base, a = str(fam4["base"]), str(fam4["expert1"])
    cfg = {"merge_method": "task_arithmetic", "base_model": base,
           "slices": [{"sources": [{"model": base, "layer_range": [1, 3]},
                                   {"model": a, "layer_range": [1, 3], "parameters": {"weight": w}}]}
                      for w in (0.5, 1.0)]}
    plan = make_plan(load_recipe(write_cfg(tmp_path, cfg)))
    assert plan.layer_sources == (1, 2, 1, 2)
    got = dict((j.name, j) for j in plan.jobs)
    sb, sa = states(fam4["base"]), states(fam4["expert1"])
    out = write_model_dir(plan, tmp_path / "out")
    merged = states(out)
    for j, (src, w) in enumerate([(1, 0.5), (2, 0.5), (1, 1.0), (2, 1.0)]):
        name = f"model.layers.{j}.mlp.up_proj.weight"
        assert got[name].source_name("expert1") == f"model.layers.{src}.mlp.up_proj.weight"
        b = sb[f"model.layers.{src}.mlp.up_proj.weight"]
        torch.testing.assert_close(merged[name], b + w * (sa[f"model.layers.{src}.mlp.up_proj.weight"] - b))


def test_tiling_slices_keep_the_plain_plan(fam4, tmp_path):
    a, b = str(fam4["expert1"]), str(fam4["expert2"])
    cfg = {"merge_method": "linear", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}],
         "parameters": {"weight": 0.5}},
        {"sources": [{"model": a, "layer_range": [2, 4]}, {"model": b, "layer_range": [2, 4]}],
         "parameters": {"weight": 0.5}}]}
    plan = make_plan(load_recipe(write_cfg(tmp_path, cfg)))
    assert plan.layer_sources is None and all(not j.reads for j in plan.jobs)


@pytest.mark.parametrize("ranges, match", [
    ([[0, 2], [1, 4]], "different numbers of layers"),
    ([[0, 2], [3, 5]], "which has 4 layers"),
])
def test_bad_general_slices(fam4, tmp_path, ranges, match):
    a, b = str(fam4["expert1"]), str(fam4["expert2"])
    cfg = {"merge_method": "linear", "parameters": {"weight": 1.0},
           "slices": [{"sources": [{"model": a, "layer_range": ranges[0]}, {"model": b, "layer_range": ranges[1]}]}]}
    with pytest.raises(EvomergeError, match=match):
        make_plan(load_recipe(write_cfg(tmp_path, cfg)))
