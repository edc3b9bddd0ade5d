"""The Python API (evomerge/api.py): the same results as the command line, from a notebook or a script."""

import json
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge import EvomergeError, api


def _recipe(family, method="ties"):
    models = {"base": {"path": str(family["base"])}}
    for i, name in enumerate(n for n in family if n != "base"):
        models[name] = {"path": str(family[name]), "parameters": {"weight": 0.4 + 0.2 * i, "density": 0.7}}
    return {"method": method, "base": "base", "models": models, "seed": 3}


def _weights(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_merge_from_a_dict_a_path_and_a_mergekit_config_equals_the_cli(family, tmp_path):
    d = _recipe(family)
    (tmp_path / "r.yml").write_text(yaml.safe_dump(d))
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(tmp_path / "r.yml"), "--out",
                          str(tmp_path / "cli"), "-q"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert api.merge(d, tmp_path / "from_dict") == tmp_path / "from_dict"
    api.merge(tmp_path / "r.yml", tmp_path / "from_path")
    (tmp_path / "mk.yml").write_text(api.to_mergekit(d))
    api.merge(tmp_path / "mk.yml", tmp_path / "from_mergekit")
    want = _weights(tmp_path / "cli")
    for out in ("from_dict", "from_path", "from_mergekit"):
        got = _weights(tmp_path / out)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), out


def test_merge_into_a_resident_model_gives_the_directorys_weights(family, tmp_path):
    from transformers import AutoModelForCausalLM

    d = _recipe(family, "dare_ties")
    api.merge(d, tmp_path / "dir")
    want = _weights(tmp_path / "dir")
    model = api.merge_into(d)  # the reference model loaded, then overwritten in place
    state = model.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)
    other = AutoModelForCausalLM.from_pretrained(family["base"])
    assert api.merge_into(d, other) is other
    assert all(torch.equal(other.state_dict()[k], want[k]) for k in want)


def test_bad_inputs_raise_the_users_error_and_write_nothing(family, tmp_path):
    with pytest.raises(EvomergeError, match="a recipe must be a YAML path"):
        api.recipe(42)
    with pytest.raises(EvomergeError, match="does not exist"):
        api.merge(tmp_path / "missing.yml", tmp_path / "out")
    bad = _recipe(family)
    bad["base"] = "nobody"
    with pytest.raises(EvomergeError, match="base 'nobody'"):
        api.merge(bad, tmp_path / "out")
    with pytest.raises(EvomergeError, match="not supported"):
        api.merge(_recipe(family), tmp_path / "out", device="tpu")
    assert not (tmp_path / "out").exists()
    path = {"method": "dataflow", "models": {"a": {"path": str(family["base"])}}, "head": "a",
            "path": [{"model": "a", "layer": 0}]}
    with pytest.raises(EvomergeError, match="merge_into builds parameter-space recipes"):
        api.merge_into(path)


def test_search_status_resume_and_export_from_python(micro_zoo, tmp_path):
    cfg = {"models": {n: str(micro_zoo / "models" / n) for n in ("base", "shift", "mirror")}, "base": "base",
           "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]}},
           "objective": {"include_path": str(micro_zoo / "tasks"), "limit": 16,
                         "tasks": [{"name": "zoo_mixed_search", "metric": "acc"}]},
           "optimizer": {"seed": 0, "budget": 3, "popsize": 3}, "workers": {"count": 1, "cpus": 1}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(cfg))
    st = api.search(tmp_path / "s.yaml", tmp_path / "run", progress=False)
    assert st["evaluations"] == 3 and st["best"] is not None
    assert api.status(tmp_path / "run")["best"]["id"] == st["best"]["id"]
    assert api.resume(tmp_path / "run", progress=False) is None  # the budget is spent: nothing to do
    with pytest.raises(EvomergeError, match="already holds a search"):
        api.search(tmp_path / "s.yaml", tmp_path / "run", progress=False)
    st = api.resume(tmp_path / "run", budget=4, progress=False)
    assert st["evaluations"] == 4
    out = api.export(tmp_path / "run", tmp_path / "best")
    recorded = yaml.safe_load((out / "evomerge_recipe.yaml").read_text())
    assert recorded == json.loads(json.dumps(api.status(tmp_path / "run")["best"]["recipe"]))


def test_status_says_when_the_pick_is_by_validation_not_the_top_search_fitness(capsys, monkeypatch):
    from evomerge import cli

    monkeypatch.delenv("COLUMNS", raising=False)  # a narrow COLUMNS in the environment would make rich wrap cells
    st = {"run_dir": "r", "evaluations": 9, "budget": 9, "failures": 0, "evaluations_per_minute": 3.0,
          "best_fitness": 0.99, "best": {"id": 25, "fitness": 0.97, "validation": 0.98, "metrics": {"t": 0.97}}}
    cli._print_status(st)
    out = capsys.readouterr().out
    assert "#25" in out and "picked by validation" in out and "what export builds" in out
    assert "best search fitness" in out and "0.9900" in out
    cli._print_status({**st, "best_fitness": 0.97, "best": {**st["best"], "validation": None}})
    out = capsys.readouterr().out
    assert "picked by validation" not in out and "best search fitness" not in out
