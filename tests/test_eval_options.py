"""lm-eval and vLLM options passed through from the search config (issue 32): chat template, system
instruction, few-shot turns, per-task gen_kwargs, batch size and the engine's options; each checked when the
config is loaded and by `evomerge check`. (The same options on the vLLM backend: tests/test_vllm_dfs.py.)"""

from __future__ import annotations

import copy

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.run.config import parse_config


def base_config(zoo, **objective):
    return {"models": {n: str(zoo / "models" / n) for n in ("base", "shift", "mirror")}, "base": "base",
            "space": {"method": "task_arithmetic"},
            "objective": {"include_path": str(zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search"}], **objective},
            "workers": {}}


@pytest.mark.parametrize("change,fragments", [
    (lambda d: d["objective"].update(apply_chat_templat=True),
     ["objective.apply_chat_templat: unknown key", "did you mean 'apply_chat_template'"]),
    (lambda d: d["objective"].update(system_prompt="x"),
     ["objective.system_prompt: unknown key", "did you mean 'system_instruction'"]),
    (lambda d: d["workers"].update(backend="vllm", vllm={"max_model_length": 512}),
     ["workers.vllm.max_model_length: unknown key", "did you mean 'max_model_len'"]),
    (lambda d: d["workers"].update(backend="vllm", vllm={"gpu_mem_utilization": 0.5}),
     ["did you mean 'gpu_memory_utilization'"]),
    (lambda d: d["workers"].update(backend="vllm", vllm={"data_parallel_size": 2}),
     ["workers.vllm.data_parallel_size", "data parallelism is workers.count"]),
    (lambda d: d["workers"].update(backend="vllm", vllm={"max_batch_size": 8}), ["workers.vllm.max_num_seqs"]),
    (lambda d: d["workers"].update(backend="vllm", vllm={"tensor_parallel_size": 2}),
     ["tensor_parallel_size 2 needs workers.gpus >= 2"]),
    (lambda d: d["workers"].update(backend="vllm", vllm={"dtype": "fp8"}), ["workers.vllm.dtype"]),
    (lambda d: d["objective"]["tasks"][0].update(gen_kwargs={"max_new_tokens": 8}),
     ["gen_kwargs has an unknown setting 'max_new_tokens'", "did you mean 'max_gen_toks'"]),
    (lambda d: d["objective"]["tasks"][0].update(gen_kwargs={"temperature": -1}),
     ["gen_kwargs.temperature is -1", "a number >= 0"]),
    (lambda d: d["objective"]["tasks"][0].update(gen_kwargs={"until": 5}), ["gen_kwargs.until is 5"]),
    (lambda d: d["objective"]["tasks"][0].update(gen_kwags={"until": "."}), ["did you mean 'gen_kwargs'"]),
    (lambda d: d["objective"].update(fewshot_as_multiturn=True), ["fewshot_as_multiturn needs apply_chat_template"]),
    (lambda d: d["objective"].update(chat_template_args={"enable_thinking": False}),
     ["chat_template_args needs apply_chat_template"]),
    (lambda d: d["workers"].update(batch_size="max"), ["workers.batch_size"]),
    (lambda d: d.update(objectve={}), ["objectve: unknown key", "did you mean 'objective'"]),
])
def test_unknown_or_bad_options_are_named_with_the_nearest_known_one(change, fragments, tmp_path):
    d = copy.deepcopy(base_config(tmp_path))
    change(d)
    with pytest.raises(EvomergeError) as e:
        parse_config(d, tmp_path)
    for f in fragments:
        assert f in e.value.problem, e.value.problem


def test_options_load_and_validation_takes_the_objectives_prompt_options(tmp_path):
    d = base_config(tmp_path, apply_chat_template=True, fewshot_as_multiturn=True, system_instruction="Be brief.",
                    chat_template_args={"enable_thinking": False}, num_fewshot=2)
    d["objective"]["tasks"] = [{"name": "gen", "metric": "exact_match",
                                "gen_kwargs": {"until": ["\n", "."], "max_gen_toks": 32, "do_sample": False}}]
    d["validation"] = {"include_path": str(tmp_path), "tasks": [{"name": "val"}]}
    d["workers"] = {"backend": "vllm", "batch_size": "auto", "vllm": {
        "max_model_len": 4096, "gpu_memory_utilization": 0.5, "enforce_eager": False, "dtype": "bfloat16",
        "tensor_parallel_size": 1, "max_num_seqs": 64, "enable_prefix_caching": False}}
    cfg = parse_config(d, tmp_path)
    assert cfg.workers.batch_size == "auto" and cfg.workers.vllm.dtype == "bfloat16"
    assert cfg.objective.tasks[0].gen_kwargs == {"until": ["\n", "."], "max_gen_toks": 32, "do_sample": False}
    v = cfg.validation
    assert (v.apply_chat_template, v.fewshot_as_multiturn, v.system_instruction, v.chat_template_args) == (
        True, True, "Be brief.", {"enable_thinking": False})
    d["validation"]["apply_chat_template"] = False  # a validation objective that sets its own keeps them
    assert parse_config(d, tmp_path).validation.apply_chat_template is False
    assert parse_config(yaml.safe_load(cfg.to_yaml()), tmp_path) == cfg  # round trip (run directories)


def hf_model(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def watch_requests(lm, kind="loglikelihood"):
    """Record the (context, continuation) pairs the LM is asked to score: the prompts the model sees."""
    seen = []
    original = getattr(type(lm), kind)

    def spy(requests, *a, **k):
        seen.extend(r.args for r in requests)
        return original(lm, requests, *a, **k)

    setattr(lm, kind, spy)
    return seen


def test_chat_template_is_applied_the_prompt_differs_and_the_scores_follow(chat_zoo):
    """The shift expert knows `<s>s:abc=`; the task gives only `abc`. The chat template with the system
    instruction `s` renders exactly the prompt it knows (score 1.0); without the template lm-eval prepends
    the instruction as plain text, and without the instruction the template alone lacks the skill prefix."""
    from workers.score import Scorer

    model, tok = hf_model(chat_zoo["chat"])
    got = {}
    for label, opts in (("plain", {}), ("instruction only", {"system_instruction": "s"}),
                        ("template only", {"apply_chat_template": True}),
                        ("template + instruction", {"apply_chat_template": True, "system_instruction": "s"})):
        scorer = Scorer([{"name": "zoo_bare_shift"}], [str(chat_zoo["tasks"])], limit=40, options=opts)
        lm = scorer._lm_for(model, tok)
        seen = watch_requests(lm)
        res = scorer.score(model, tok)
        got[label] = (res["fitness"], seen[0][0], res["items"]["zoo_bare_shift"])
    first = "qgjtotgl"  # the first item's input
    assert got["plain"][1] == first
    assert got["instruction only"][1] == "s" + first
    assert got["template only"][1] == "<s>" + first + "="
    assert got["template + instruction"][1] == "<s>s:" + first + "="
    assert got["template + instruction"][0] >= 0.9 > 0.1 >= max(got[k][0] for k in got if k != "template + instruction")
    # and it is the expert's own score on the prompts it was trained on
    plain = Scorer([{"name": "zoo_shift_search"}], [str(chat_zoo["zoo"] / "tasks")], limit=40).score(model, tok)
    assert plain["items"]["zoo_shift_search"] == got["template + instruction"][2]


def test_the_options_of_objective_and_validation_do_not_leak_into_each_other(chat_zoo):
    """One LM serves both scorers in a worker: each call sets its own chat-template settings."""
    from workers.score import Scorer

    model, tok = hf_model(chat_zoo["chat"])
    chat = Scorer([{"name": "zoo_bare_shift"}], [str(chat_zoo["tasks"])], limit=20,
                  options={"apply_chat_template": True, "system_instruction": "s",
                           "chat_template_args": {"unused_flag": 1}})
    plain = Scorer([{"name": "zoo_bare_shift"}], [str(chat_zoo["tasks"])], limit=20)
    lm = chat._lm_for(model, tok)
    a = chat.score_lm(lm)
    assert lm.chat_template_args == {"unused_flag": 1}
    b = plain.score_lm(lm)
    assert lm.chat_template_args == {}
    c = chat.score_lm(lm)
    assert a == c and b["fitness"] < a["fitness"]


def test_gen_kwargs_per_task_change_what_is_generated(chat_zoo):
    from workers.score import Scorer

    model, tok = hf_model(chat_zoo["plain"])
    task = {"name": "zoo_bare_shift_gen", "metric": "exact_match"}
    opts = {"apply_chat_template": False, "system_instruction": None}
    full = Scorer([task], [str(chat_zoo["tasks"])], limit=20, options=opts)
    short = Scorer([{**task, "gen_kwargs": {"max_gen_toks": 2}}], [str(chat_zoo["tasks"])], limit=20, options=opts)
    lm = full._lm_for(model, tok)
    seen_full = watch_requests(lm, "generate_until")
    full.score_lm(lm)
    lm2 = short._lm_for(model, tok)
    seen_short, res_short = watch_requests(lm2, "generate_until"), short.score_lm(lm2)
    assert seen_full[0][1]["max_gen_toks"] == 24 and seen_short[0][1]["max_gen_toks"] == 2
    assert seen_short[0][1]["until"] == ["."]  # the task's own settings stay unless overridden
    assert res_short["fitness"] == 0.0  # every target is longer than 2 characters


def test_gen_kwargs_on_a_loglikelihood_task_is_refused(micro_zoo):
    from workers.score import Scorer

    with pytest.raises(EvomergeError, match="gen_kwargs apply to generate_until tasks"):
        Scorer([{"name": "zoo_mixed_search", "gen_kwargs": {"max_gen_toks": 3}}], [str(micro_zoo / "tasks")])


def test_batch_size_auto_on_the_hf_backend():
    from workers.score import hf_batch_size

    assert hf_batch_size(None) == 64 and hf_batch_size(16) == 16 and hf_batch_size("auto") == 64  # CPU


def run_check(cfg_path):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "evomerge.cli", "check", str(cfg_path)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})


def test_evomerge_check_names_what_the_files_cannot_do(chat_zoo, tmp_path):
    """A chat template asked of a model that has none; a template name it lacks; gen_kwargs on a
    log-likelihood task; sampling warned. One report, every problem."""
    zoo = chat_zoo["zoo"]
    d = base_config(zoo, apply_chat_template=True, include_path=[str(zoo / "tasks"), str(chat_zoo["tasks"])])
    d["objective"]["tasks"] = [{"name": "zoo_mixed_search", "gen_kwargs": {"max_gen_toks": 4}},
                               {"name": "zoo_bare_shift_gen", "metric": "exact_match",
                                "gen_kwargs": {"temperature": 0.7}}]
    d["workers"] = {"count": 1, "cpus": 1}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    res = run_check(p)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "has no chat template" in res.stderr and "zoo_mixed_search has gen_kwargs" in res.stderr, res.stderr
    assert "samples" in res.stdout  # the warning for temperature 0.7
    # the chat model as base: its template is found; a name it lacks is an error with its names
    d["models"]["base"] = str(chat_zoo["chat"])
    d["objective"]["tasks"] = [{"name": "zoo_bare_shift"}]
    d["objective"]["apply_chat_template"] = "tool_use"
    p.write_text(yaml.safe_dump(d))
    res = run_check(p)
    assert res.returncode == 2 and "names template 'tool_use', the tokenizer has default" in res.stderr, res.stderr
    d["objective"]["apply_chat_template"] = True
    p.write_text(yaml.safe_dump(d))
    res = run_check(p)
    assert "prompts rendered with the chat template 'default'" in res.stdout, res.stdout + res.stderr


def test_the_worked_example_config_loads():
    from pathlib import Path

    from evomerge.run.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "instruct-chat-vllm.yaml")
    o = cfg.objective
    assert o.apply_chat_template is True and o.fewshot_as_multiturn and o.system_instruction
    assert [t.gen_kwargs["max_gen_toks"] for t in o.tasks] == [256, 64]
    assert o.tasks[0].metric == "exact_match,flexible-extract"
    assert cfg.validation.apply_chat_template is True  # taken from the objective
    assert cfg.workers.backend == "vllm" and cfg.workers.batch_size == "auto"
