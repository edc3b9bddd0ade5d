"""Security: weights only from safetensors, no pickle loading anywhere, no remote code unless asked for,
configs that cannot run code, and no writes outside the places the user pointed at.

(The bad-input corpus holds the user-facing cases too: pickle-only weights, a YAML python tag, an Optuna
storage that would hold a pickle, a storage path escaping the run directory.)"""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {("pickle", "load"), ("pickle", "loads"), ("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"),
             ("marshal", "loads"), ("dill", "load"), ("cloudpickle", "load"), ("joblib", "load"),
             ("numpy", "load"), ("np", "load")}


def _calls(path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                yield (f.value.id, f.attr), node.lineno, node
            elif isinstance(f, ast.Name) and f.id in ("eval", "exec", "__import__"):
                yield (None, f.id), node.lineno, node


def test_no_pickle_or_code_loading_in_the_package():
    bad = []
    for path in [*ROOT.joinpath("evomerge").rglob("*.py"), *ROOT.joinpath("workers").rglob("*.py")]:
        for (mod, attr), line, node in _calls(path):
            if (mod, attr) in FORBIDDEN or mod is None:
                bad.append(f"{path.relative_to(ROOT)}:{line} {mod}.{attr}")
            if attr == "from_pretrained":  # transformers: never remote code unless the config says so
                for kw in node.keywords:
                    if kw.arg == "trust_remote_code" and isinstance(kw.value, ast.Constant) and kw.value.value:
                        bad.append(f"{path.relative_to(ROOT)}:{line} trust_remote_code=True")
                    if kw.arg == "use_safetensors" and isinstance(kw.value, ast.Constant) and not kw.value.value:
                        bad.append(f"{path.relative_to(ROOT)}:{line} use_safetensors=False")
    assert not bad, "unsafe loading: " + ", ".join(bad)


def test_trust_remote_code_is_off_by_default():
    from evomerge.run.config import WorkersSpec

    assert WorkersSpec().trust_remote_code is False


def test_custom_model_code_never_runs(family, tmp_path):
    """A model directory that ships its own modelling code (auto_map) is merged from its config and
    safetensors; its Python file is never imported."""
    evil = tmp_path / "evil"
    shutil.copytree(family["expert1"], evil)
    marker = tmp_path / "pwned"
    (evil / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    cfg = json.loads((evil / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (evil / "config.json").write_text(json.dumps(cfg))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(family["expert2"]), "parameters": {"weight": 0.5}},
        {"model": str(evil), "parameters": {"weight": 0.5}}]}))
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(recipe), "--out", str(tmp_path / "out"),
                          "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert not marker.exists()
    from transformers import AutoModelForCausalLM  # loading the result the usual way does not run it either

    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert not marker.exists()


def test_storage_inside_the_run_directory_only(micro_zoo, tmp_path):
    import pytest

    from evomerge.errors import EvomergeError
    from evomerge.run.config import parse_config
    from evomerge.run.spaces import make_optimizer, make_space

    def cfg(storage):
        return parse_config({
            "models": {n: str(micro_zoo / "models" / n) for n in ("base", "shift", "mirror")}, "base": "base",
            "space": {"method": "task_arithmetic", "search": ["weight"]},
            "objective": {"include_path": str(micro_zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search"}]},
            "optimizer": {"kind": "optuna", "sampler": "tpe", "storage": storage}}, micro_zoo)

    run = tmp_path / "run"
    run.mkdir()
    c = cfg("../outside.db")
    with pytest.raises(EvomergeError, match="outside the run directory"):
        make_optimizer(c, make_space(c), run)
    assert not (tmp_path / "outside.db").exists()
    c = cfg("sub/../study.db")  # normalises to a file inside: fine
    make_optimizer(c, make_space(c), run)
    assert (run / "study.db").exists()
    with pytest.raises(Exception, match="pickle"):
        parse_config({**yaml.safe_load(c.to_yaml()), "optimizer": {"kind": "optuna", "sampler": "cmaes",
                                                                    "storage": "study.db"}}, micro_zoo)
