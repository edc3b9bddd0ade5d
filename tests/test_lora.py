"""LoRA adapters as merge sources: the same weights as PEFT's own merge_and_unload, without a merged copy on disk."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.merge.build import iter_merged
from evomerge.merge.load import parse_recipe
from evomerge.merge.plan import make_plan
from evomerge.merge.sources import open_source

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from evomerge.zoo.tiny import make_family

    return make_family(tmp_path_factory.mktemp("lora_fam"), "llama", n_experts=1, hidden=64, layers=2)


def make_adapter(base_dir, out, seed=0, **lora_kw):
    """A PEFT adapter with random non-zero A and B saved as safetensors, and PEFT's merged state dict."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(init_lora_weights=False, **lora_kw)
    pm = get_peft_model(model, cfg)
    with torch.no_grad():  # init_lora_weights=False already randomises B; make the update clearly visible
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.mul_(4.0)
    pm.save_pretrained(out, safe_serialization=True)
    merged = pm.merge_and_unload()
    return out, {k: v.detach().clone() for k, v in merged.state_dict().items()}


def build(recipe_dict):
    plan = make_plan(parse_recipe(recipe_dict))
    try:
        return {n: t.clone() for n, t in iter_merged(plan, threads=1)}
    finally:
        plan.close()


def assert_matches(ours, ref, tol=1e-5):
    assert set(ours) <= set(ref)
    worst = max((ours[k] - ref[k].float()).abs().max().item() for k in ours)
    assert worst <= tol, worst


def test_adapter_source_equals_peft_merge(fam, tmp_path):
    ad, ref = make_adapter(fam["base"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=ALL)
    src = open_source("ad", ad)  # bare adapter: base from adapter_config.json
    assert src.path == fam["base"].resolve() and len(src.deltas) == 2 * len(ALL)
    ours = build({"method": "linear", "models": {"ad": {"path": str(ad), "parameters": {"weight": 1.0}}}})
    assert_matches(ours, ref)
    # the adapter changed the weights it targets, and only those
    base = open_source("base", fam["base"])
    changed = {k for k in ours if not torch.equal(ours[k], base.get(k).float())}
    assert changed == set(src.deltas)


def test_task_arithmetic_with_adapter_and_rslora(fam, tmp_path):
    ad, ref = make_adapter(fam["base"], tmp_path / "ad", r=8, lora_alpha=16, use_rslora=True,
                           target_modules=["q_proj", "v_proj", "down_proj"], alpha_pattern={"down_proj": 4})
    cfg = json.loads((ad / "adapter_config.json").read_text())
    assert cfg["use_rslora"] and cfg["alpha_pattern"] == {"down_proj": 4}
    # explicit base with mergekit's BASE+ADAPTER syntax, task arithmetic weight 1.0 = the adapted model
    ours = build({"method": "task_arithmetic", "base": "base",
                  "models": {"base": {"path": str(fam["base"])},
                             "ad": {"path": f"{fam['base']}+{ad}", "parameters": {"weight": 1.0}}}})
    assert_matches(ours, ref)


def test_embeddings_modules_to_save_and_bias(tmp_path):
    from evomerge.zoo.tiny import make_family

    qwen = make_family(tmp_path / "q", "qwen2", n_experts=0, hidden=64, layers=2)["base"]  # q/k/v have biases
    ad, ref = make_adapter(qwen, tmp_path / "ad", r=4, lora_alpha=4, target_modules=["q_proj", "embed_tokens"],
                           modules_to_save=["lm_head"], bias="lora_only", lora_bias=False)
    src = open_source("ad", ad)
    assert "model.embed_tokens.weight" in src.deltas and "lm_head.weight" in src.replaced
    ours = build({"method": "linear", "models": {"ad": {"path": str(ad), "parameters": {"weight": 1.0}}}})
    assert_matches(ours, ref)


def test_merge_adapter_with_expert_cli(fam, tmp_path):
    """The command line merges an adapter with a full fine-tune; the output loads in transformers."""
    from transformers import AutoModelForCausalLM

    ad, ref = make_adapter(fam["base"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=ALL)
    recipe = {"method": "task_arithmetic", "base": "base",
              "models": {"base": {"path": str(fam["base"])},
                         "ad": {"path": str(ad), "parameters": {"weight": 0.5}},
                         "ex": {"path": str(fam["expert1"]), "parameters": {"weight": 0.5}}}}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(tmp_path / "r.yaml"), "--out",
                          str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    base, ex = open_source("b", fam["base"]), open_source("e", fam["expert1"])
    for k, v in out.items():
        if k in ref:
            want = base.get(k) + 0.5 * (ref[k] - base.get(k)) + 0.5 * (ex.get(k) - base.get(k))
            assert torch.allclose(v, want, atol=1e-5), k


def test_worker_builder_holds_adapter(fam, tmp_path):
    from workers.build import CandidateBuilder

    ad, ref = make_adapter(fam["base"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=ALL)
    builder = CandidateBuilder({"base": str(fam["base"]), "ad": str(ad)}, resident_from="base")
    recipe = parse_recipe({"method": "task_arithmetic", "base": "base",
                           "models": {"base": {"path": str(fam["base"])},
                                      "ad": {"path": str(ad), "parameters": {"weight": 1.0}}}})
    model = builder.build(recipe)
    assert_matches({k: v for k, v in model.state_dict().items() if k in ref}, ref)
    builder.close()


def test_adapter_on_the_wrong_base(fam, tmp_path):
    from evomerge.zoo.tiny import make_family

    ad, _ = make_adapter(fam["base"], tmp_path / "ad", r=4, lora_alpha=8, target_modules=ALL)
    wide = make_family(tmp_path / "w", "llama", n_experts=0, hidden=32, layers=2)["base"]
    with pytest.raises(EvomergeError, match="shape") as e:
        open_source("ad", f"{wide}+{ad}")
    assert "BASE+ADAPTER" in e.value.fix
    # base named in adapter_config.json that does not exist, no hub cache: names the fix
    moved = shutil.copytree(ad, tmp_path / "moved")
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvomergeError, match="not a local directory") as e:
        open_source("ad", moved)
    assert "+" in e.value.fix
    # DoRA is refused with the fix
    cfg["use_dora"] = True
    cfg["base_model_name_or_path"] = str(fam["base"])
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvomergeError, match="DoRA"):
        open_source("ad", moved)
