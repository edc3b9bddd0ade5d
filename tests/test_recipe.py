"""Recipes: settings semantics, YAML round trips, hashes, and mergekit config round trips."""

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.merge.load import parse_recipe
from evomerge.merge.mergekit_config import from_mergekit
from evomerge.merge.mergekit_out import mergekit_yaml, to_mergekit
from evomerge.merge.recipe import Recipe
from evomerge.merge.settings import evaluate_setting, layer_index

RECIPE = {
    "method": "ties",
    "base": "base",
    "models": {
        "base": {"path": "/m/base"},
        "math": {"path": "/m/math", "parameters": {"weight": [0.2, 0.4, 0.8], "density": 0.5}},
        "jp": {"path": "/m/jp", "parameters": {
            "weight": [{"filter": "self_attn", "value": 0.3}, {"value": [1.0, 0.0]}], "density": 0.7}},
    },
    "parameters": {"normalize": True, "lambda": 1.1},
    "dtype": "float32",
    "seed": 3,
}


def test_gradient_interpolates_over_layers():
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0.2, 0.4, 0.8], "x", 0.75) == pytest.approx(0.6)
    assert evaluate_setting([0.2, 0.4, 0.8], "x", 1.0) == pytest.approx(0.8)


def test_filter_rules_first_match_wins():
    rules = [{"filter": "self_attn", "value": 1.0}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 5}]
    assert evaluate_setting(rules, "model.layers.0.self_attn.q_proj.weight", 0.5) == 1.0
    assert evaluate_setting(rules, "model.layers.0.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(rules, "model.norm.weight", 0.5) == 5
    assert evaluate_setting(rules[:1], "model.norm.weight", 0.5) is None


def test_layer_index():
    assert layer_index("model.layers.12.mlp.down_proj.weight") == 12
    assert layer_index("model.embed_tokens.weight") is None


def test_yaml_round_trip_and_stable_hash():
    r = parse_recipe(RECIPE)
    again = parse_recipe(yaml.safe_load(r.to_yaml()))
    assert again == r
    assert again.content_hash() == r.content_hash()
    shuffled = dict(reversed(list(RECIPE.items())))
    assert parse_recipe(shuffled).content_hash() == r.content_hash()
    changed = parse_recipe({**RECIPE, "seed": 4})
    assert changed.content_hash() != r.content_hash()


def test_recipe_is_frozen():
    r = parse_recipe(RECIPE)
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        r.method = "linear"


def test_recipe_to_mergekit_and_back():
    r = parse_recipe(RECIPE)
    mk = to_mergekit(r)
    assert mk["merge_method"] == "ties" and mk["base_model"] == "/m/base"
    assert [m["model"] for m in mk["models"]] == ["/m/math", "/m/jp"]
    back = from_mergekit(yaml.safe_load(mergekit_yaml(r)))
    assert back.models["math"] == r.models["math"] and back.models["jp"] == r.models["jp"]
    assert back.parameters == r.parameters and back.base == "base" and back.method == "ties"


MERGEKIT_SLERP = """
slices:
  - sources:
      - model: /m/a
        layer_range: [0, 4]
      - model: /m/b
        layer_range: [0, 4]
merge_method: slerp
base_model: /m/a
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
"""


def test_model_card_style_mergekit_slerp_round_trip():
    r = parse_recipe(yaml.safe_load(MERGEKIT_SLERP))
    assert r.method == "slerp" and r.base == "a" and r.dtype == "bfloat16"
    assert r.slices and r.slices[0].layer_range == (0, 4)
    mk = yaml.safe_load(mergekit_yaml(r))
    assert mk["slices"][0]["sources"][0]["layer_range"] == [0, 4]
    assert mk["parameters"] == yaml.safe_load(MERGEKIT_SLERP)["parameters"]
    assert parse_recipe(mk) == r


def test_mergekit_multi_slice_parameters_resolve_per_slice():
    from evomerge.merge.methods import get_method
    from evomerge.merge.plan import resolve_params

    cfg = {"merge_method": "ties", "base_model": "/m/base", "slices": [
        {"sources": [{"model": "/m/base", "layer_range": [0, 2]},
                     {"model": "/m/x", "layer_range": [0, 2], "parameters": {"weight": 0.1}}]},
        {"sources": [{"model": "/m/base", "layer_range": [2, 4]},
                     {"model": "/m/x", "layer_range": [2, 4], "parameters": {"weight": [0.2, 0.6]}}],
         "parameters": {"density": 0.4}}]}
    r = parse_recipe(cfg)
    m = get_method("ties")
    _, tp = resolve_params(r, m, "model.layers.1.mlp.up_proj.weight", 4, ["x"])
    assert tp == [{"weight": 0.1, "density": 1.0}]
    _, tp = resolve_params(r, m, "model.layers.3.mlp.up_proj.weight", 4, ["x"])
    assert tp[0]["weight"] == pytest.approx(0.6) and tp[0]["density"] == 0.4
    _, tp = resolve_params(r, m, "lm_head.weight", 4, ["x"])  # post-weights use the last slice at t = 0
    assert tp[0]["weight"] == pytest.approx(0.2)
    assert parse_recipe(to_mergekit(r)) == r


def test_models_form_uses_whole_model_gradient_and_t0_outside_layers():
    from evomerge.merge.methods import get_method
    from evomerge.merge.plan import resolve_params

    r = parse_recipe(RECIPE)
    m = get_method("ties")
    gp, tp = resolve_params(r, m, "model.layers.1.mlp.up_proj.weight", 3, ["math", "jp"])
    assert gp == {"normalize": True, "rescale": False, "int8_mask": False, "lambda": 1.1}
    assert tp[0]["weight"] == pytest.approx(0.4) and tp[1]["weight"] == pytest.approx(0.5)
    _, tp = resolve_params(r, m, "model.layers.2.self_attn.q_proj.weight", 3, ["math", "jp"])
    assert tp[1]["weight"] == 0.3
    _, tp = resolve_params(r, m, "model.embed_tokens.weight", 3, ["math", "jp"])
    assert tp[0]["weight"] == pytest.approx(0.2) and tp[1]["weight"] == pytest.approx(1.0)


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d: d.update(method="tiess"), "did you mean 'ties'"),
    (lambda d: d["models"]["math"]["parameters"].update(density=1.5), "out of range"),
    (lambda d: d["models"]["math"]["parameters"].update(dnsity=0.5), "unknown parameter 'dnsity'"),
    (lambda d: d["models"]["math"]["parameters"].pop("weight"), "has no 'weight'"),
    (lambda d: d.update(base="nope"), "base 'nope' is not one of the models"),
    (lambda d: d.update(dtype="int8"), "dtype 'int8'"),
    (lambda d: d.update(extra_key=1), "extra_key"),
    (lambda d: d["models"]["jp"]["parameters"].update(weight=[]), "empty list"),
])
def test_recipe_validation_messages(mutate, fragment):
    import copy

    d = copy.deepcopy(RECIPE)
    mutate(d)
    with pytest.raises(EvomergeError) as e:
        parse_recipe(d)
    assert fragment in str(e.value)


def test_method_input_counts():
    with pytest.raises(EvomergeError, match="exactly 1"):
        parse_recipe({"method": "slerp", "base": "a", "parameters": {"t": 0.5},
                      "models": {"a": {"path": "/a"}, "b": {"path": "/b"}, "c": {"path": "/c"}}})
    with pytest.raises(EvomergeError, match="at least 2"):
        parse_recipe({"method": "model_stock", "base": "a", "models": {"a": {"path": "/a"}, "b": {"path": "/b"}}})


def test_mergekit_slice_with_a_range_per_model_is_read_and_written_back():
    cfg = {"merge_method": "linear", "parameters": {"weight": 1.0},
           "slices": [{"sources": [{"model": "/a", "layer_range": [0, 2]}, {"model": "/b", "layer_range": [1, 3]}]}]}
    r = parse_recipe(cfg)
    assert r.slices[0].layer_range == (0, 2) and r.slices[0].ranges == {"b": (1, 3)}
    assert parse_recipe(r.to_dict()) == r  # the recipe keeps the ranges
    assert [s["layer_range"] for s in to_mergekit(r)["slices"][0]["sources"]] == [[0, 2], [1, 3]]
    plain = parse_recipe({**cfg, "slices": [{"sources": [{"model": "/a", "layer_range": [0, 2]},
                                                          {"model": "/b", "layer_range": [0, 2]}]}]})
    assert "ranges" not in plain.to_dict()["slices"][0]  # old recipes keep their hashes
    cfg["slices"][0]["sources"][1]["layer_range"] = [1, 4]
    with pytest.raises(EvomergeError, match="different numbers of layers"):
        parse_recipe(cfg)


def test_mergekit_passthrough_is_read_as_a_data_flow_path():
    cfg = {"merge_method": "passthrough", "dtype": "bfloat16",
           "slices": [{"sources": [{"model": "/m/a", "layer_range": [0, 2]}]},
                      {"sources": [{"model": "/m/b", "layer_range": [1, 3]}]},
                      {"sources": [{"model": "/m/a", "layer_range": [2, 3]}]}]}
    r = parse_recipe(cfg)
    assert r.method == "dataflow" and r.head == "a" and r.dtype == "bfloat16"
    assert [(h.model, h.layer, h.scale) for h in r.path] == [("a", 0, 1.0), ("a", 1, 1.0), ("b", 1, 1.0),
                                                             ("b", 2, 1.0), ("a", 2, 1.0)]
    assert r.tail is None  # the last slice is model A's: final norm and head from A
    # mergekit takes the final norm and LM head from the last slice's model (found on real configs: mergekit's
    # examples/orcamini-platy-44layer.yml was built differently before): the path's tail
    last = cfg["slices"].pop()
    r = parse_recipe(cfg)
    assert r.head == "a" and r.tail == "b" and r.path[-1].model == "b"
    cfg["slices"].append(last)
    cfg["slices"][0]["sources"][0]["parameters"] = {"scale": 0.5}
    with pytest.raises(EvomergeError, match="sets parameters"):
        parse_recipe(cfg)
    cfg["slices"][0]["sources"][0]["parameters"] = {}
    cfg["slices"][1]["sources"][0]["layer_range"] = [3, 1]
    with pytest.raises(EvomergeError, match="layer_range"):
        parse_recipe(cfg)


def test_recipe_type():
    assert isinstance(parse_recipe(RECIPE), Recipe)


def test_every_shipped_config_parses():
    """configs/*.yaml: search configs load (paths resolved), recipes and mergekit configs parse."""
    from pathlib import Path

    import yaml

    from evomerge.merge.load import load_recipe
    from evomerge.run.config import load_config

    root = Path(__file__).resolve().parents[1] / "configs"
    seen = 0
    for f in sorted(root.glob("*.y*ml")):
        data = yaml.safe_load(f.read_text())
        if "objective" in data:
            cfg = load_config(f)
            assert all(Path(p).is_absolute() for p in cfg.models.values())
        else:
            assert load_recipe(f).models  # recipes and mergekit configs (models are not opened)
        seen += 1
    assert seen >= 6


# ---- issue 29: YAML read as mergekit reads it ------------------------------------------------------------------
@pytest.mark.parametrize("text, value", [("1e-10", 1e-10), ("1.0e30", 1e30), ("-5E3", -5000.0), (".5", 0.5),
                                         ("-.5", -0.5), ("+2e+3", 2000.0), ("1.5", 1.5), ("3", 3)])
def test_yaml_numbers_in_every_spelling_mergekit_accepts(tmp_path, text, value):
    from evomerge.merge.yaml_io import read_yaml

    (tmp_path / "c.yml").write_text(f"tol: {text}\nname: '1e-10'\n")
    d = read_yaml(tmp_path / "c.yml")
    assert d["tol"] == value and type(d["tol"]) is type(value)
    assert d["name"] == "1e-10"  # quoted: still a string


def test_karcher_tol_written_with_an_exponent_is_a_number(tmp_path):
    from evomerge.merge.load import load_recipe

    (tmp_path / "k.yml").write_text("merge_method: karcher\nmodels:\n  - model: /m/a\n  - model: /m/b\n"
                                    "parameters:\n  tol: 1e-10\n  max_iter: 10\n")
    r = load_recipe(tmp_path / "k.yml")
    assert r.parameters["tol"] == 1e-10


@pytest.mark.parametrize("name, text", [
    ("config", "models: {a: x, b: y}\noptimizer:\n  popsize: 8\n  sigma0: 0.2\noptimizer:\n  budget: 4\n"),
    ("mergekit", "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters:\n      weight: 1\n"
                 "      weight: 0.5\n"),
])
def test_duplicate_yaml_keys_are_an_error_naming_key_and_line(tmp_path, name, text):
    from evomerge.merge.load import load_recipe
    from evomerge.run.config import load_config

    (tmp_path / "c.yml").write_text(text)
    with pytest.raises(EvomergeError) as e:
        (load_config if name == "config" else load_recipe)(tmp_path / "c.yml")
    key, lines = ("optimizer", "lines 2 and 5") if name == "config" else ("weight", "lines 6 and 7")
    assert f"'{key}' is given twice ({lines})" in e.value.problem and e.value.fix


def test_run_directory_config_with_a_duplicate_key_is_refused(tmp_path):
    from evomerge.run.status import status

    (tmp_path / "config.yaml").write_text("seed: 0\nseed: 1\n")
    with pytest.raises(EvomergeError, match="'seed' is given twice"):
        status(tmp_path)


# ---- issue 29: every key mergekit accepts ------------------------------------------------------------------------
def _mk(method, params=None, top=None, **extra):
    models = [{"model": "/m/a", **({"parameters": params} if params else {})},
              {"model": "/m/b", **({"parameters": params} if params else {})}]
    return {"merge_method": method, "base_model": "/m/base", "models": models,
            **({"parameters": top} if top else {}), **extra}


def test_parameters_mergekit_ignores_are_accepted_with_a_warning(capsys):
    r = from_mergekit(_mk("model_stock", {"weight": 0.7}))
    assert all("weight" not in m.parameters for m in r.models.values())
    assert "models[0].parameters.weight is ignored by model_stock" in capsys.readouterr().err
    r = from_mergekit(_mk("sce", {"weight": 1.0, "density": 0.5}, {"normalize": True, "select_topk": 0.5}))
    assert r.parameters == {"select_topk": 0.5} and all(not m.parameters for m in r.models.values())
    err = capsys.readouterr().err
    assert "parameters.normalize is ignored by sce" in err and "parameters.density is ignored by sce" in err
    r = from_mergekit(_mk("ties", {"weight": 0.5, "density": 0.5}, {"normalize": True}))  # read by ties: kept
    assert r.parameters == {"normalize": True} and capsys.readouterr().err == ""


def test_any_parameter_mergekit_declares_is_accepted_where_the_method_ignores_it(capsys):
    """Found on model cards (tests/fixtures/mergekit_corpus): `weight` under arcee_fusion, `normalize` under
    multislerp, `rescale`/`lambda`/`filter_wise` under sce. mergekit ignores them; so does evomerge, saying so."""
    r = from_mergekit({"merge_method": "arcee_fusion", "base_model": "/m/base", "models": [{"model": "/m/a",
                       "parameters": {"weight": [{"filter": "lm_head", "value": 1}, {"value": [1, 0.5]}]}}]})
    assert not r.models["a"].parameters and "weight is ignored by arcee_fusion" in capsys.readouterr().err
    r = from_mergekit(_mk("multislerp", {"weight": 0.5}, {"normalize": True}))
    assert r.parameters == {} and "parameters.normalize is ignored by multislerp" in capsys.readouterr().err
    r = from_mergekit(_mk("sce", None, {"rescale": True, "lambda": 1.0, "filter_wise": False, "select_topk": 0.1}))
    assert r.parameters == {"select_topk": 0.1}
    err = capsys.readouterr().err
    assert all(f"parameters.{k} is ignored by sce" in err for k in ("rescale", "lambda", "filter_wise"))
    # a name no mergekit method declares is still refused (mergekit would ignore it silently)
    with pytest.raises(EvomergeError, match="unknown parameter 'smooth'"):
        from_mergekit(_mk("sce", None, {"smooth": False, "select_topk": 0.1})).validate_semantics()
    with pytest.raises(EvomergeError, match="unknown parameter 'desnity' in models.a.parameters"):
        from_mergekit(_mk("ties", {"weight": 0.5, "desnity": 0.5})).validate_semantics()


def test_true_false_parameters_read_0_and_1_as_mergekit_does():
    """`normalize: 1.0` (as mergekit-evolve writes it; a real card's della_linear config) is true in mergekit."""
    r = from_mergekit(_mk("della_linear", {"weight": 0.5, "density": 0.5}, {"normalize": 1.0, "int8_mask": 0}))
    assert r.parameters == {"normalize": True, "int8_mask": False}
    r.validate_semantics()
    with pytest.raises(EvomergeError, match="'normalize' must be true or false, got 0.5"):
        from_mergekit(_mk("della_linear", {"weight": 0.5}, {"normalize": 0.5})).validate_semantics()


def test_the_single_default_module_is_read_as_the_top_level():
    """`modules: {default: {slices: ...}}` (a real card's della_linear config) is a plain slices config."""
    sl = [{"sources": [{"model": "/m/a", "layer_range": [0, 2], "parameters": {"weight": 0.4, "density": 0.5}},
                       {"model": "/m/base", "layer_range": [0, 2]}]}]
    r = from_mergekit({"merge_method": "della_linear", "base_model": "/m/base", "parameters": {"lambda": 0.9},
                       "modules": {"default": {"slices": sl, "parameters": {"lambda": 1.1, "epsilon": 0.1}}}})
    want = from_mergekit({"merge_method": "della_linear", "base_model": "/m/base", "slices": sl,
                          "parameters": {"lambda": 1.1, "epsilon": 0.1}})
    assert r == want
    for modules in ({"default": {"slices": sl}, "vision": {"slices": sl}}, {"text": {"slices": sl}}):
        with pytest.raises(EvomergeError, match="multi-module configs are not supported"):
            from_mergekit({"merge_method": "linear", "modules": modules})


def test_a_parameter_at_the_top_level_says_where_it_belongs():
    with pytest.raises(EvomergeError, match="'select_topk' \\(a merge parameter: at the top level mergekit "
                                            "ignores it; it goes under `parameters:`\\)"):
        from_mergekit(_mk("sce", None, None, select_topk=0.15))
    with pytest.raises(EvomergeError, match="'pad_to_multiple_of' \\(a `tokenizer:` setting"):
        from_mergekit(_mk("linear", {"weight": 1.0}, None, pad_to_multiple_of=8))


def test_unknown_mergekit_key_names_the_nearest():
    with pytest.raises(EvomergeError, match="'dype' \\(did you mean 'dtype'\\?\\)"):
        from_mergekit(_mk("linear", {"weight": 1.0}, dype="float32"))


def test_tokenizer_block_source_is_honoured_and_tokens_warned(capsys):
    r = from_mergekit(_mk("linear", {"weight": 1.0}, tokenizer={"source": "base"}))
    assert r.tokenizer_source == "base" and capsys.readouterr().err == ""
    r = from_mergekit(_mk("linear", {"weight": 1.0}, tokenizer={"source": "/m/b", "tokens": {"<x>": {"source": "/m/a"}},
                                                               "pad_to_multiple_of": 64}))
    assert r.tokenizer_source == "b"
    err = capsys.readouterr().err
    assert "tokenizer.tokens" in err and "tokenizer.pad_to_multiple_of" in err and "ignored" in err
    with pytest.raises(EvomergeError, match="did you mean 'source'"):
        from_mergekit(_mk("linear", {"weight": 1.0}, tokenizer={"sorce": "base"}))
    with pytest.raises(EvomergeError, match="both"):
        from_mergekit(_mk("linear", {"weight": 1.0}, tokenizer={"source": "base"}, tokenizer_source="base"))
    with pytest.raises(EvomergeError, match="tokenizer.source '/m/zz' is not one of the models"):
        from_mergekit(_mk("linear", {"weight": 1.0}, tokenizer={"source": "/m/zz"}))


def test_chat_template_by_name_or_template_string(capsys):
    from evomerge.merge.mergekit_config import CHAT_TEMPLATES

    r = from_mergekit(_mk("linear", {"weight": 1.0}, chat_template="chatml"))
    assert r.chat_template == CHAT_TEMPLATES["chatml"] and "<|im_start|>" in r.chat_template
    assert to_mergekit(r)["chat_template"] == r.chat_template
    assert r.content_hash() != from_mergekit(_mk("linear", {"weight": 1.0})).content_hash()
    t = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert from_mergekit(_mk("linear", {"weight": 1.0}, chat_template=t)).chat_template == t
    assert capsys.readouterr().err == ""
    assert from_mergekit(_mk("linear", {"weight": 1.0}, chat_template="auto")).chat_template is None
    assert "chat_template 'auto' is ignored" in capsys.readouterr().err


def test_merge_writes_the_chat_template_and_the_named_models_tokenizer(family, tmp_path):
    import json

    from evomerge.merge.export.model_dir import write_model_dir
    from evomerge.merge.load import load_recipe
    from evomerge.merge.plan import make_plan

    cfg = {"merge_method": "linear", "models": [{"model": str(family["expert1"]), "parameters": {"weight": 0.5}},
                                                {"model": str(family["expert2"]), "parameters": {"weight": 0.5}}],
           "tokenizer": {"source": str(family["expert2"])}, "chat_template": "chatml"}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    plan = make_plan(load_recipe(tmp_path / "c.yml"))
    try:
        out = write_model_dir(plan, tmp_path / "out")
    finally:
        plan.close()
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tc["chat_template"]
    assert (out / "tokenizer.json").read_bytes() == (family["expert2"] / "tokenizer.json").read_bytes()
