"""Data-flow (layer-path) merges: the search space, the in-memory path model, export as a plain model, the
PS+DFS hybrid and its resume, and bad input."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import EvomergeError
from evomerge.merge.dataflow import Hop, PathRecipe, parse_path_recipe, to_mergekit_passthrough
from evomerge.merge.export.path_dir import write_path_model
from evomerge.run.rundir import RunDir, read_ledger
from evomerge.search.dfs_space import OFF, ON, DataflowSpace
from workers.path_model import PathBuilder


def path_recipe(a, b, hops, head="a"):
    return parse_path_recipe({"method": "dataflow", "head": head, "models": {"a": {"path": str(a)},
                                                                             "b": {"path": str(b)}},
                              "path": [{"model": m, "layer": layer, "scale": s} for m, layer, s in hops]})


HOPS = [("a", 0, 1.0), ("b", 1, 0.7), ("a", 1, 1.3), ("b", 1, 1.1), ("b", 0, 0.8), ("a", 2, 0.9)]


# ---- the space ---------------------------------------------------------------------------------------------

def space(**kw):
    return DataflowSpace(models={"a": "/m/a", "b": "/m/b"}, layers={"a": 3, "b": 3}, **kw)


def test_x0_is_model_a_itself_and_paths_start_and_end_in_a():
    s = space(repeats=3)
    assert s.T == 18 and s.dim == len(s.free) + 36
    x0 = s.to_recipe(s.x0)
    assert [(h.model, h.layer, h.scale) for h in x0.path] == [("a", 0, 1.0), ("a", 1, 1.0), ("a", 2, 1.0)]
    rng = np.random.default_rng(0)
    for _ in range(300):
        r = s.to_recipe(rng.uniform(s.lower, s.upper))
        assert (r.path[0].model, r.path[0].layer) == ("a", 0) and (r.path[-1].model, r.path[-1].layer) == ("a", 2)
        assert all(0.5 <= h.scale <= 1.5 for h in r.path)


@pytest.mark.parametrize("scales", ["matrix", "layer", "none"])
def test_vector_path_round_trip(scales):
    s = space(repeats=2, scales=scales)
    rng = np.random.default_rng(1)
    for _ in range(200):
        r = s.to_recipe(rng.uniform(s.lower, s.upper))
        assert s.to_recipe(s.from_recipe(r)) == r


def test_indicator_genes_switch_slots_and_max_hops_keeps_the_strongest():
    s = space(repeats=2, scales="none", max_hops=4)
    x = np.full(s.dim, -0.5)
    on = {s.free.index(t): v for t, v in zip((3, 4, 7), (0.9, 0.2, 0.6), strict=True)}  # b0, b1, a1 (rep 2)
    for i, v in on.items():
        x[i] = v
    path = [(h.model, h.layer) for h in s.to_recipe(x).path]
    assert path == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]  # b1 (weakest gene) dropped for max_hops
    five = [("a", 0), ("b", 0), ("b", 1), ("a", 1), ("a", 2)]
    with pytest.raises(EvomergeError, match="max_hops"):
        s.from_recipe(PathRecipe(head="a", models={}, path=tuple(Hop(model=m, layer=n) for m, n in five)))


def test_paths_outside_the_space_are_refused():
    s = space(repeats=1)
    with pytest.raises(EvomergeError, match="start with layer 0"):
        s.from_recipe(PathRecipe(head="a", models={}, path=(Hop(model="b", layer=0), Hop(model="a", layer=2))))
    r = s.to_recipe(s.x0)
    back = r.model_copy(update={"path": (r.path[0], r.path[2], r.path[1], r.path[2])})  # a0 a2 a1 a2: 2 reps
    with pytest.raises(EvomergeError, match="repetitions"):
        s.from_recipe(back)


@pytest.mark.parametrize("repeats", [1, 2, 3])
def test_every_partner_layer_is_reachable_in_every_repetition(repeats):
    """Akiba et al.'s path starts at A's first layer and ends at A's last; the partners' slots of the last
    repetition (all of them with one repetition) must stay on offer, not be cut off behind that end."""
    s = DataflowSpace(models={"a": "/m/a", "b": "/m/b", "c": "/m/c"}, layers={"a": 3, "b": 2, "c": 1},
                      repeats=repeats, scales="none")
    reached = set()
    for i in range(s.n_ind):  # one gene on at a time
        x = np.full(s.dim, OFF)
        x[i] = ON
        path = s.path_slots(x)
        assert path[0] == s.first and s.slots[path[-1]] == ("a", 2)
        reached |= set(path)
    partner_slots = {t for t in range(s.T) if s.slots[t][0] != "a"}
    assert len(partner_slots) == 3 * repeats and partner_slots <= reached
    assert set(range(s.T)) <= reached  # A's own layers too, in every repetition
    last_rep = [(m, n) for m, n in s.layer_index if m != "a"]  # the partners, all within the last repetition
    recipe = PathRecipe(head="a", models={}, path=(Hop(model="a", layer=0), *(Hop(model=m, layer=n) for m, n in
                                                                                  last_rep), Hop(model="a", layer=2)))
    assert [(h.model, h.layer) for h in s.to_recipe(s.from_recipe(recipe)).path] == [(h.model, h.layer)
                                                                                    for h in recipe.path]
    assert any("every layer of every model" in line for line in s.reach())
    assert not any("unreachable" in line for line in s.reach())


@pytest.mark.parametrize("kw,fragment", [
    ({"repeats": 0}, "repeats"), ({"max_hops": 1}, "max_hops"), ({"scales": "cube"}, "scales"),
    ({"scale_bounds": (1.0, float("nan"))}, "scale_bounds"), ({"scale_bounds": (1.5, 0.5)}, "scale_bounds"),
])
def test_invalid_space_settings(kw, fragment):
    with pytest.raises(EvomergeError, match=fragment):
        space(**kw)


# ---- in-memory path model and export ----------------------------------------------------------------------

def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
def test_path_model_equals_its_exported_plain_model(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.tiny import make_family

    fam = make_family(tmp_path / arch, arch, n_experts=2, hidden=64, layers=3)
    r = path_recipe(fam["expert1"], fam["expert2"], HOPS)
    pb = PathBuilder()
    model = pb.build(r)
    # hops share the sources' tensors: nothing copied
    src = pb.models[next(k for k in pb.models if k.endswith("expert2"))]
    assert model.model.layers[1].mlp.down_proj.weight is src.model.layers[1].mlp.down_proj.weight
    assert model.model.layers[3].self_attn.layer_idx == 3  # its own KV-cache slot
    out = write_path_model(r, tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert exported.config.num_hidden_layers == len(HOPS)
    ids = torch.tensor([[1, 5, 9, 20, 33, 40, 7, 12]])
    want, got = logits(model, ids), logits(exported, ids)
    assert (want - got).abs().max() <= 1e-3 * want.abs().max()  # equal up to the norms' eps
    plain = write_path_model(path_recipe(fam["expert1"], fam["expert2"], [(m, n, 1.0) for m, n, _ in HOPS]),
                             tmp_path / "plain")
    assert (logits(AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32), ids) - got).abs().max() > 1e-3
    mk = (out / "mergekit_config.yml")
    assert mk.exists() == (arch != "gemma2")  # Gemma2's post-norm fold is not a weight multiplication


@pytest.mark.parametrize("strip", ["a", "both"])
def test_gemma2_path_export_has_the_scored_models_layer_types(strip, tmp_path):
    """Issue 28 #7: a source whose config.json lacks `layer_types` (older Gemma 2 checkpoints) gets the
    types transformers derives, in the export as in the path model that was scored; no KeyError when only
    one source has them."""
    import json

    from transformers import AutoConfig

    from evomerge.zoo.tiny import make_family

    fam = make_family(tmp_path / "g", "gemma2", n_experts=2, hidden=64, layers=6)
    for name in (["expert1"] if strip == "a" else ["expert1", "expert2"]):
        p = fam[name] / "config.json"
        cfg = json.loads(p.read_text())
        cfg.pop("layer_types", None)
        p.write_text(json.dumps(cfg))
    hops = [("a", 0, 1.0), ("b", 2, 1.0), ("a", 4, 1.0), ("b", 1, 1.0), ("a", 3, 1.0), ("b", 5, 1.0), ("b", 5, 1.0)]
    r = path_recipe(fam["expert1"], fam["expert2"], hops)
    types = {"a": AutoConfig.from_pretrained(fam["expert1"]).layer_types,
             "b": AutoConfig.from_pretrained(fam["expert2"]).layer_types}
    want = [types[m][layer] for m, layer, _ in hops]
    assert len(set(want)) == 2  # both kinds occur, so a wrong pick shows
    scored = PathBuilder().build(r).config.layer_types
    exported = AutoConfig.from_pretrained(write_path_model(r, tmp_path / "x")).layer_types
    assert list(scored) == want and list(exported) == want


def test_path_model_on_the_zoo_scores_like_its_export(micro_zoo, tmp_path):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.score import Scorer

    z = micro_zoo / "models"
    r = path_recipe(z / "shift", z / "mirror", [("a", 0, 1.0), ("b", 1, 1.2), ("a", 1, 0.9)])
    tok = AutoTokenizer.from_pretrained(z / "shift")
    scorer = Scorer([{"name": "zoo_mixed_search", "metric": "acc"}], [str(micro_zoo / "tasks")])
    mem = scorer.score_lm(HFLM(pretrained=PathBuilder().build(r), tokenizer=tok, batch_size=64))
    exported = AutoModelForCausalLM.from_pretrained(write_path_model(r, tmp_path / "x"), dtype=torch.float32)
    assert scorer.score(exported, tok)["items"] == mem["items"]


def test_mergekit_passthrough_config_for_a_path(family):
    r = path_recipe(family["expert1"], family["expert2"], HOPS)
    mk = to_mergekit_passthrough(r, "linear")
    assert mk["merge_method"] == "passthrough" and len(mk["slices"]) == len(HOPS)
    p = np.cumprod([s for _, _, s in HOPS])
    for sl, (m, layer, _), pk in zip(mk["slices"], HOPS, p, strict=True):
        (src,) = sl["sources"]
        assert src["layer_range"] == [layer, layer + 1] and src["model"] == str(family[
            "expert1" if m == "a" else "expert2"])
        if abs(pk - 1) > 1e-12:
            assert src["parameters"]["scale"][0] == {"filter": "o_proj", "value": pytest.approx(1 / pk)}
    with pytest.raises(EvomergeError, match="mergekit cannot express"):
        to_mergekit_passthrough(r, "postnorm")


def test_evomerge_merge_builds_a_mergekit_passthrough_config(family, tmp_path):
    """A mergekit passthrough config (layer stacking) is built by `evomerge merge` through the data-flow export:
    the same weights as the path it describes (issue 29)."""
    from safetensors.torch import load_file

    hops = [("a", 0, 1.0), ("b", 1, 1.0), ("a", 1, 1.0), ("a", 2, 1.0)]
    r = path_recipe(family["expert1"], family["expert2"], hops)
    (tmp_path / "pt.yml").write_text(yaml.safe_dump(to_mergekit_passthrough(r, "linear")))
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(tmp_path / "pt.yml"), "--out",
                          str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    want = load_file(write_path_model(r, tmp_path / "ref") / "model.safetensors")
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_a_passthrough_config_ending_in_another_model_takes_its_norm_and_head_as_mergekit_does(family, tmp_path):
    """mergekit takes the embeddings from the first slice's model and the final norm and LM head from the last
    slice's (mergekit/plan.py); `evomerge merge` builds the same (the path's `tail`), and writes it back to the same
    passthrough config (issue 29: mergekit's examples/orcamini-platy-44layer.yml)."""
    from safetensors.torch import load_file

    e1, e2 = str(family["expert1"]), str(family["expert2"])
    cfg = {"merge_method": "passthrough", "dtype": "float32",
           "slices": [{"sources": [{"model": e1, "layer_range": [0, 2]}]},
                      {"sources": [{"model": e2, "layer_range": [1, 3]}]}]}
    (tmp_path / "pt.yml").write_text(yaml.safe_dump(cfg))
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(tmp_path / "pt.yml"), "--out",
                          str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    got = load_file(tmp_path / "out" / "model.safetensors")
    a, b = load_file(family["expert1"] / "model.safetensors"), load_file(family["expert2"] / "model.safetensors")
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"])
    assert not torch.equal(a["model.norm.weight"], b["model.norm.weight"])  # the test can tell them apart
    if "lm_head.weight" in b:
        assert torch.equal(got["lm_head.weight"], b["lm_head.weight"])
    assert torch.equal(got["model.layers.3.mlp.down_proj.weight"], b["model.layers.2.mlp.down_proj.weight"])
    r = parse_path_recipe(yaml.safe_load((tmp_path / "out" / "evomerge_recipe.yaml").read_text()))
    back = to_mergekit_passthrough(r, "linear")
    assert [s["sources"][0]["model"] for s in back["slices"]][-1] == e2
    # a path whose tail is not its last hop's model has no passthrough form
    with pytest.raises(EvomergeError, match="mergekit cannot express"):
        to_mergekit_passthrough(r.model_copy(update={"tail": None}), "linear")


# ---- bad input (through the CLI) ---------------------------------------------------------------------------

def run_merge(recipe, tmp_path):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    return subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(tmp_path / "r.yaml"), "--out",
                           str(tmp_path / "out"), "-q"], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case,fragment", [
    ("empty", "the path has no layers"),
    ("width", "hidden size"),
    ("nan", "finite number"),
    ("layer", "asks for layer 7"),
    ("head", "head 'c'"),
])
def test_bad_dataflow_recipes(case, fragment, family, tmp_path):
    from evomerge.zoo.tiny import make_family

    models = {"a": {"path": str(family["expert1"])}, "b": {"path": str(family["expert2"])}}
    path = [{"model": "a", "layer": 0}, {"model": "b", "layer": 1}, {"model": "a", "layer": 2}]
    head = "a"
    if case == "empty":
        path = []
    elif case == "width":
        narrow = make_family(tmp_path / "narrow", "llama", n_experts=1, hidden=32, layers=3)
        models["b"] = {"path": str(narrow["expert1"])}
    elif case == "nan":
        path[1]["scale"] = float("nan")
    elif case == "layer":
        path[1]["layer"] = 7
    elif case == "head":
        head = "c"
    res = run_merge({"method": "dataflow", "head": head, "models": models, "path": path}, tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert fragment in res.stderr and "fix:" in res.stderr
    assert not (tmp_path / "out").exists()


# ---- searches -----------------------------------------------------------------------------------------------

def search_config(zoo, mode, ps_budget=4, dfs_budget=4):
    d = {"models": {n: str(zoo / "models" / n) for n in ("base", "shift", "mirror")}, "base": "base",
         "search": mode,
         "objective": {"include_path": str(zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search"}], "limit": 30},
         "optimizer": {"seed": 0, "budget": ps_budget, "popsize": 4, "sigma0": 0.3},
         "workers": {"count": 1, "cpus": 1}}
    if mode == "dataflow":
        d["dataflow"] = {"head": "shift", "partners": ["mirror"], "budget": dfs_budget, "popsize": 4, "repeats": 2}
    else:
        d["space"] = {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]},
                      "x0": 0.5}
        d["dataflow"] = {"partners": ["mirror"], "budget": dfs_budget, "popsize": 4, "repeats": 2}
    return d


def test_dataflow_search_end_to_end_and_export(micro_zoo, ray_local, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.run.config import parse_config
    from evomerge.run.stages import run_search
    from evomerge.run.status import export_best

    st = run_search(parse_config(search_config(micro_zoo, "dataflow"), micro_zoo), tmp_path / "run", progress=False)
    assert st["evaluations"] == 4 and st["failures"] == 0
    evals = [r for r in RunDir(tmp_path / "run").records() if r["type"] == "eval"]
    assert all(r["recipe"]["method"] == "dataflow" and len(r["items"]["zoo_mixed_search"]) == 30 for r in evals)
    out = export_best(tmp_path / "run", tmp_path / "best")
    AutoModelForCausalLM.from_pretrained(out)
    assert (tmp_path / "best.mergekit.yml").read_text().startswith("merge_method: passthrough")


def test_a_run_recorded_with_another_space_layout_is_not_resumed(micro_zoo, tmp_path):
    """The data-flow vector's layout changed (A's last layer now ends the path after the last slot): a run
    recorded with vectors of another length is refused on resume, not replayed onto the wrong candidates."""
    from evomerge.run.config import parse_config
    from evomerge.run.controller import Controller
    from evomerge.run.rundir import LEDGER, _encode
    from evomerge.run.spaces import make_space

    cfg = parse_config(search_config(micro_zoo, "dataflow"), micro_zoo)
    dim = make_space(cfg).dim
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / LEDGER).write_text(_encode({"type": "eval", "id": 0, "x": [0.5] * (dim - 3), "fitness": 0.5}))
    with pytest.raises(EvomergeError, match=f"vectors of {dim - 3} genes.*has {dim}"):
        Controller(cfg, run, resume=True, progress=False, worker_cls=object).run()
    assert (run / LEDGER).read_text().count("\n") == 1  # left as it was


def test_hybrid_hands_over_and_resumes_across_the_stage_boundary(micro_zoo, tmp_path):
    cfg_path = tmp_path / "hybrid.yaml"
    cfg_path.write_text(yaml.safe_dump(search_config(micro_zoo, "hybrid", ps_budget=4, dfs_budget=8)))
    run = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(cfg_path), "--run-dir", str(run),
                             "-q"], env=env, start_new_session=True)
    dfs_ledger = run / "dfs" / "ledger.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not dfs_ledger.exists() or len(read_ledger(dfs_ledger)[0]) < 2):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # mid data-flow stage
    proc.wait()
    assert 2 <= len(read_ledger(dfs_ledger)[0]) < 8
    ps_before = (run / "ps" / "ledger.jsonl").read_bytes()
    best_mtime = (run / "ps-best" / "model.safetensors").stat().st_mtime_ns
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "resume", str(run), "-q"], env=env,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (run / "ps" / "ledger.jsonl").read_bytes() == ps_before  # the finished stage was not rerun
    assert (run / "ps-best" / "model.safetensors").stat().st_mtime_ns == best_mtime  # nor re-exported
    dfs = [r for r in RunDir(run / "dfs").records() if r["type"] == "eval"]
    assert sorted(r["id"] for r in dfs) == list(range(8))
    assert all(r["recipe"]["head"] == "ps_merge" and r["recipe"]["models"]["ps_merge"]["path"] == str(
        run / "ps-best") for r in dfs)
    from evomerge.run.status import status

    st = status(run)
    assert st["stage"] == "dfs" and st["stages"]["ps"]["evaluations"] == 4 and st["evaluations"] == 8


def test_three_sources_and_unequal_layer_counts():
    s = DataflowSpace(models={"a": "/m/a", "b": "/m/b", "c": "/m/c"}, layers={"a": 2, "b": 3, "c": 1}, repeats=2)
    assert s.M == 6 and s.T == 12 and s.last == 12 and s.slots[s.last] == ("a", 1)  # the fixed end after the slots
    rng = np.random.default_rng(2)
    used = set()
    for _ in range(300):
        r = s.to_recipe(rng.uniform(s.lower, s.upper))
        assert s.to_recipe(s.from_recipe(r)) == r
        used |= {h.model for h in r.path}
    assert used == {"a", "b", "c"}
