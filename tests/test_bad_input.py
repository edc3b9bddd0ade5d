"""Every kind of bad input gives one clear message, exit code 2, no traceback, and no output left behind."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.errors import EvomergeError


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def write_cfg(path, cfg):
    path.write_text(yaml.safe_dump(cfg) if not isinstance(cfg, str) else cfg)
    return path


def ties_cfg(a, b, base):
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(a), "parameters": {"weight": 0.5, "density": 0.5}},
                       {"model": str(b), "parameters": {"weight": 0.5, "density": 0.5}}]}


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_clean_failure(res, fragment, out=None):
    assert res.returncode == 2, res.stderr + res.stdout
    assert fragment in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert "fix:" in res.stderr
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.fixture
def fam(family, tmp_path):
    return {k: copy_model(v, tmp_path / k) for k, v in family.items()}


def test_good_config_works(fam, tmp_path):
    cfg = write_cfg(tmp_path / "c.yml", ties_cfg(fam["expert1"], fam["expert2"], fam["base"]))
    res = run_cli("merge", cfg, "--out", tmp_path / "out", "-q")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_mismatched_architectures(fam, tmp_path):
    from evomerge.zoo.tiny import make_family

    other = make_family(tmp_path / "q", "qwen2", n_experts=0, hidden=64, layers=3)["base"]
    cfg = write_cfg(tmp_path / "c.yml", ties_cfg(fam["expert1"], other, fam["base"]))
    assert_clean_failure(run_cli("merge", cfg, "--out", tmp_path / "out"), "different architectures", tmp_path / "out")


def test_mismatched_tensor_shape(fam, tmp_path):
    f = fam["expert2"] / "model.safetensors"
    sd = load_file(f)
    name = "model.layers.0.mlp.up_proj.weight"
    sd[name] = torch.zeros(sd[name].shape[0] + 1, sd[name].shape[1])
    save_file(sd, f, metadata={"format": "pt"})
    cfg = write_cfg(tmp_path / "c.yml", ties_cfg(fam["expert1"], fam["expert2"], fam["base"]))
    assert_clean_failure(run_cli("merge", cfg, "--out", tmp_path / "out"), f"tensor '{name}' has shape",
                         tmp_path / "out")


def test_missing_tensor(fam, tmp_path):
    f = fam["expert1"] / "model.safetensors"
    sd = load_file(f)
    sd.pop("model.layers.1.self_attn.k_proj.weight")
    save_file(sd, f, metadata={"format": "pt"})
    cfg = write_cfg(tmp_path / "c.yml", ties_cfg(fam["expert1"], fam["expert2"], fam["base"]))
    assert_clean_failure(run_cli("merge", cfg, "--out", tmp_path / "out"), "lacks 1 tensor(s)", tmp_path / "out")


def test_missing_model_directory(fam, tmp_path):
    cfg = write_cfg(tmp_path / "c.yml", ties_cfg(fam["expert1"], tmp_path / "nope", fam["base"]))
    assert_clean_failure(run_cli("merge", cfg, "--out", tmp_path / "out"), "does not exist", tmp_path / "out")


def test_missing_shard_file(sharded_family, tmp_path):
    fam = {k: copy_model(v, tmp_path / k) for k, v in sharded_family.items()}
    index = json.loads((fam["expert1"] / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (fam["expert1"] / victim).unlink()
    cfg = write_cfg(tmp_path / "c.yml", ties_cfg(fam["expert1"], fam["expert2"], fam["base"]))
    assert_clean_failure(run_cli("merge", cfg, "--out", tmp_path / "out"), f"shard '{victim}'", tmp_path / "out")


def test_truncated_weights(fam, tmp_path):
    f = fam["expert1"] / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    cfg = write_cfg(tmp_path / "c.yml", ties_cfg(fam["expert1"], fam["expert2"], fam["base"]))
    assert_clean_failure(run_cli("merge", cfg, "--out", tmp_path / "out"), "past the end of the file",
                         tmp_path / "out")


def test_pickle_weights_are_refused(fam, tmp_path):
    d = fam["expert1"]
    sd = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(sd, d / "pytorch_model.bin")
    cfg = write_cfg(tmp_path / "c.yml", ties_cfg(fam["expert1"], fam["expert2"], fam["base"]))
    assert_clean_failure(run_cli("merge", cfg, "--out", tmp_path / "out"), "only pickle weights", tmp_path / "out")


def test_unknown_method_lists_known_ones(fam, tmp_path):
    cfg = ties_cfg(fam["expert1"], fam["expert2"], fam["base"])
    cfg["merge_method"] = "tie"
    res = run_cli("merge", write_cfg(tmp_path / "c.yml", cfg), "--out", tmp_path / "out")
    assert_clean_failure(res, "unknown merge method 'tie'", tmp_path / "out")
    assert "known methods:" in res.stderr and "dare_ties" in res.stderr


def test_parameter_out_of_range(fam, tmp_path):
    cfg = ties_cfg(fam["expert1"], fam["expert2"], fam["base"])
    cfg["models"][0]["parameters"]["density"] = [0.5, 1.7]
    res = run_cli("merge", write_cfg(tmp_path / "c.yml", cfg), "--out", tmp_path / "out")
    assert_clean_failure(res, "density = 1.7 is out of range", tmp_path / "out")


def test_della_epsilon_too_wide(fam, tmp_path):
    cfg = ties_cfg(fam["expert1"], fam["expert2"], fam["base"])
    cfg["merge_method"] = "della"
    cfg["models"][0]["parameters"]["epsilon"] = 0.5
    res = run_cli("merge", write_cfg(tmp_path / "c.yml", cfg), "--out", tmp_path / "out")
    assert_clean_failure(res, "density - epsilon > 0", tmp_path / "out")


def test_unreadable_yaml(tmp_path):
    cfg = write_cfg(tmp_path / "c.yml", "merge_method: ties\nmodels: [\n  - {model: a\n")
    assert_clean_failure(run_cli("merge", cfg, "--out", tmp_path / "out"), "not readable YAML", tmp_path / "out")


def test_yaml_that_is_not_a_mapping(tmp_path):
    cfg = write_cfg(tmp_path / "c.yml", "- just\n- a list\n")
    assert_clean_failure(run_cli("merge", cfg, "--out", tmp_path / "out"), "expected a YAML mapping")


def test_config_file_missing(tmp_path):
    assert_clean_failure(run_cli("merge", tmp_path / "none.yml", "--out", tmp_path / "out"), "does not exist")


def test_output_path_exists(fam, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    cfg = write_cfg(tmp_path / "c.yml", ties_cfg(fam["expert1"], fam["expert2"], fam["base"]))
    res = run_cli("merge", cfg, "--out", tmp_path / "out")
    assert_clean_failure(res, "already exists")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_different_vocab_sizes(fam, tmp_path):
    cfgp = fam["expert2"] / "config.json"
    c = json.loads(cfgp.read_text())
    c["vocab_size"] += 8
    cfgp.write_text(json.dumps(c))
    cfg = write_cfg(tmp_path / "c.yml", ties_cfg(fam["expert1"], fam["expert2"], fam["base"]))
    assert_clean_failure(run_cli("merge", cfg, "--out", tmp_path / "out"), "differ in vocab_size", tmp_path / "out")


def test_debug_shows_traceback(tmp_path):
    res = run_cli("--debug", "merge", tmp_path / "none.yml", "--out", tmp_path / "out")
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_known_broken_environments_are_named_with_their_fix():
    from evomerge.errors import environment_fix

    fix = environment_fix(RuntimeError("operator torchvision::nms does not exist"))
    assert fix and "pip uninstall -y torchvision torchaudio torchcodec" in fix
    assert environment_fix(ValueError("something else")) is None


def test_out_in_a_directory_that_is_not_writable(fam, tmp_path, monkeypatch, capsys):
    """A read-only filesystem or a directory without write permission (checked with os.access: root passes
    chmod, so the test fakes the answer)."""
    from evomerge.merge.export.files import check_output_path

    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(tmp_path / "ro") else real(p, mode))
    (tmp_path / "ro").mkdir()
    with pytest.raises(EvomergeError, match="is not writable") as e:
        check_output_path(tmp_path / "ro" / "out")
    assert e.value.fix


def test_temp_directories_of_killed_merges_are_removed_at_the_next_run(fam, tmp_path):
    """A merge killed with SIGKILL leaves its hidden temporary sibling; the next write of the same output removes
    it (its writer is dead), keeps one whose writer still runs, and never takes either for the output."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abcd1234"
    legacy = tmp_path / ".out.tmp-k2j4h5g6"  # named by a version that put no pid in the name
    live = tmp_path / f".out.tmp-{os.getppid()}-efgh5678"
    for d in (stale, legacy, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x" * 100)
    cfg = write_cfg(tmp_path / "c.yml", ties_cfg(fam["expert1"], fam["expert2"], fam["base"]))
    res = run_cli("merge", cfg, "--out", tmp_path / "out", "-q")
    assert res.returncode == 0, res.stderr
    assert not stale.exists() and not legacy.exists() and live.exists()
    assert (tmp_path / "out" / "config.json").is_file() and "removed 2 unfinished output(s)" in res.stderr
    assert not [p for p in tmp_path.glob(".out.tmp-*") if p != live]
