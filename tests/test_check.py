"""`evomerge check CONFIG`: the pre-flight report on a good config and on broken ones; `search` runs it first."""

import json
import shutil
import struct
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file, save_file


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "COLUMNS": "200"})


def write(tmp_path, zoo, name="c.yaml", models=None, **over):
    d = {"models": models or {n: str(zoo / "models" / n) for n in ("base", "shift", "mirror")},
         "base": "base",
         "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]}, "x0": 0.5},
         "objective": {"include_path": str(zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search", "metric": "acc"}]},
         "workers": {"count": 2, "cpus": 1}}
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d))
    return p


def assert_fails(res, *fragments):
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr and "fix:" in res.stderr
    for f in fragments:
        assert f in res.stderr, res.stderr


def copy_zoo_model(zoo, name, dst):
    return shutil.copytree(zoo / "models" / name, dst)


def test_good_config(micro_zoo, tmp_path):
    res = run_cli("check", write(tmp_path, micro_zoo))
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    for fragment in ("sources", "LlamaForCausalLM", "shift", "mirror", "zoo_mixed_search", "one tokenizer (80 tokens",
                     "share architecture, tensor names and shapes", "2 worker(s) fit", "total per worker",
                     "ready to search"):
        assert fragment in out, out
    assert "error" not in out


def test_check_piped_to_a_file_is_not_cut_to_80_columns(micro_zoo, tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}  # as a user's `evomerge check c.yaml > f`
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "check", str(write(tmp_path, micro_zoo))],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    assert "…" not in res.stdout and "share architecture, tensor names and shapes" in res.stdout
    assert max(len(line) for line in res.stdout.splitlines()) > 80


def test_missing_model_dir_and_every_problem_listed(micro_zoo, tmp_path):
    models = {"base": str(micro_zoo / "models/base"), "shift": str(tmp_path / "nope"),
              "mirror": str(micro_zoo / "models/mirror")}
    cfg = write(tmp_path, micro_zoo, models=models,
                objective={"tasks": [{"name": "zoo_no_such_task", "metric": "acc"}]})
    res = run_cli("check", cfg)
    assert_fails(res, "2 problem(s)", "[sources] model 'shift'", "does not exist", "[tasks]", "zoo_no_such_task")
    assert "missing" in res.stdout  # the sources table still lists it


def test_shape_mismatch(micro_zoo, tmp_path):
    bad = copy_zoo_model(micro_zoo, "shift", tmp_path / "shift")
    sd = load_file(bad / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    sd[name] = sd[name][:-8].contiguous()
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    models = {"base": str(micro_zoo / "models/base"), "shift": str(bad), "mirror": str(micro_zoo / "models/mirror")}
    assert_fails(run_cli("check", write(tmp_path, micro_zoo, models=models)), "[compatibility]", name, "shape")


def test_unknown_task(micro_zoo, tmp_path):
    cfg = write(tmp_path, micro_zoo, objective={"tasks": [{"name": "zoo_mixed_serach", "metric": "acc"}]})
    res = run_cli("check", cfg)
    assert_fails(res, "lm-eval task(s) not found: zoo_mixed_serach", "include_path")
    assert "no" in res.stdout  # the tasks table marks it


def test_vocabulary_conflict(micro_zoo, tmp_path):
    bad = copy_zoo_model(micro_zoo, "mirror", tmp_path / "mirror")
    tj = json.loads((bad / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    keys = [k for k in vocab if len(k) == 1]
    for a, b in zip(keys[::2], keys[1::2], strict=False):
        vocab[a], vocab[b] = vocab[b], vocab[a]
    (bad / "tokenizer.json").write_text(json.dumps(tj))
    models = {"base": str(micro_zoo / "models/base"), "shift": str(micro_zoo / "models/shift"), "mirror": str(bad)}
    assert_fails(run_cli("check", write(tmp_path, micro_zoo, models=models)), "[vocabulary]",
                 "'base' and 'mirror' have different tokenizers")


def _sparse_model(src, dst, rows=2**20, cols=2**18):
    """A model directory whose one tensor claims 1 TiB (a sparse file: no disk used, nothing read)."""
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")
    nbytes = rows * cols * 4
    header = json.dumps({"model.embed_tokens.weight": {"dtype": "F32", "shape": [rows, cols],
                                                       "data_offsets": [0, nbytes]}}).encode()
    with open(dst / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + nbytes)
    return dst


def test_too_much_memory(micro_zoo, tmp_path):
    models = {n: str(_sparse_model(micro_zoo / "models" / n, tmp_path / n)) for n in ("base", "shift", "mirror")}
    res = run_cli("check", write(tmp_path, micro_zoo, models=models))
    assert_fails(res, "[memory]", "one worker needs about", "TiB")


def test_gpus_requested_on_a_cpu_machine(micro_zoo, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = run_cli("check", write(tmp_path, micro_zoo, workers={"gpus": 1}))
    assert_fails(res, "[resources]", "asks for 1 GPU(s)", "workers.gpus: 0")


def test_adapter_source_in_the_report(micro_zoo, tmp_path):
    """A LoRA adapter (written by hand here: PEFT's layout) is listed as one and checked against its base."""
    import torch

    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "base_model_name_or_path": str(micro_zoo / "models/base")}))
    q = load_file(micro_zoo / "models/base/model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    pre = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{pre}.lora_A.weight": torch.randn(2, q.shape[1]), f"{pre}.lora_B.weight": torch.randn(q.shape[0], 2)},
              ad / "adapter_model.safetensors")
    models = {"base": str(micro_zoo / "models/base"), "shift": str(ad), "mirror": str(micro_zoo / "models/mirror")}
    res = run_cli("check", write(tmp_path, micro_zoo, models=models))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "LoRA adapter on base" in res.stdout


def test_search_runs_the_check_first(micro_zoo, tmp_path):
    cfg = write(tmp_path, micro_zoo, objective={"tasks": [{"name": "zoo_nope", "metric": "acc"}]},
                run_dir=str(tmp_path / "run"))
    res = run_cli("search", cfg, "-q")
    assert_fails(res, "pre-flight check", "zoo_nope")
    assert not (tmp_path / "run").exists()
