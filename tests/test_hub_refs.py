"""Models named on the Hugging Face hub (`hf:ORG/NAME`): read from the local HF cache, offline; a clear error
when a model is not there; mergekit's ORG/NAME spelling converts both ways."""

import os
import shutil
import subprocess
import sys

import yaml
from safetensors.torch import load_file

from evomerge.merge.mergekit_config import from_mergekit
from evomerge.merge.mergekit_out import to_mergekit


def fake_hub_cache(cache, repo, model_dir, commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub uses: models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    shutil.copytree(model_dir, root / "snapshots" / commit)


def run_merge(recipe_path, out, cache):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(recipe_path), "--out", str(out), "-q"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_hub_models_come_from_the_local_cache(family, tmp_path):
    cache = tmp_path / "cache"
    fake_hub_cache(cache, "evo/tiny-base", family["base"])
    recipe = {"method": "task_arithmetic", "base": "base", "dtype": "float32", "models": {
        "base": {"path": "hf:evo/tiny-base"},
        "e1": {"path": str(family["expert1"]), "parameters": {"weight": 1.0}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = run_merge(tmp_path / "r.yaml", tmp_path / "out", cache)
    assert res.returncode == 0, res.stderr
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(family["expert1"] / "model.safetensors")  # base + 1.0 * (expert1 - base)
    assert all((got[k] - want[k]).abs().max() < 1e-6 for k in want)


def test_a_hub_model_missing_offline_is_one_clear_error(family, tmp_path):
    recipe = {"method": "linear", "models": {"a": {"path": "hf:evo/not-there", "parameters": {"weight": 1}},
                                             "b": {"path": str(family["base"]), "parameters": {"weight": 1}}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    res = run_merge(tmp_path / "r.yaml", tmp_path / "out", tmp_path / "empty-cache")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "hf:evo/not-there" in res.stderr and "huggingface-cli download evo/not-there" in res.stderr
    assert not (tmp_path / "out").exists()


def test_mergekit_hub_names_round_trip(family):
    cfg = {"merge_method": "ties", "base_model": "Qwen/Qwen2.5-7B",
           "models": [{"model": "org/math-7b", "parameters": {"weight": 0.5, "density": 0.5}},
                      {"model": str(family["expert1"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    r = from_mergekit(cfg)
    paths = {m.path for m in r.models.values()}
    assert {"hf:Qwen/Qwen2.5-7B", "hf:org/math-7b", str(family["expert1"])} == paths
    back = to_mergekit(r)
    assert back["base_model"] == "Qwen/Qwen2.5-7B"
    assert {m["model"] for m in back["models"]} == {"org/math-7b", str(family["expert1"])}
