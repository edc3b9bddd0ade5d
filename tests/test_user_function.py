"""Your own scoring function as an objective (issue 32): imported only when named, called in the workers with
the built model, per-item scores in [0, 1] that racing, IRT estimates and M2N2 use like an lm-eval task's, and
a clear error for every way it can be broken (before the search: a dry call on the base model; during it: the
candidate's recorded failure)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import yaml

from evomerge.errors import EvomergeError

# A scoring function written the way a user would: the zoo's shift items, teacher-forced, 1 when the model's
# greedy choice is the target at every position (what lm-eval's `acc` on a log-likelihood task means).
GREEDY = '''
import json, os
import torch

ITEMS = [json.loads(line) for line in open({items!r})][:{limit}]
CALLS = 0


def score(model, tokenizer, items=None):
    global CALLS
    CALLS += 1
    {hook}
    ids_list = range(len(ITEMS)) if items is None else items
    out = []
    for i in ids_list:
        it = ITEMS[i]
        ctx = tokenizer(it["prompt"])["input_ids"]
        full = tokenizer(it["prompt"] + it["target"])["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0]
        pred = logits[len(ctx) - 1:len(full) - 1].argmax(-1).tolist()
        out.append(1.0 if pred == full[len(ctx):] else 0.0)
    return out
'''


def write_fn(path, zoo, limit=30, hook="pass", body=None):
    text = body if body is not None else GREEDY.format(items=str(zoo / "tasks" / "zoo_shift_search.jsonl"),
                                                       limit=limit, hook=hook)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def base_model(micro_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = micro_zoo / "models" / "base"
    return AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d)


def test_a_function_scores_like_the_lm_eval_task_it_reimplements(micro_zoo, base_model, tmp_path):
    from workers.score import Scorer

    fn = write_fn(tmp_path / "greedy.py", micro_zoo)
    model, tok = base_model
    mine = Scorer([{"name": "mine", "function": f"{fn}:score"}])
    theirs = Scorer([{"name": "zoo_shift_search"}], [str(micro_zoo / "tasks")], limit=30)
    base = mine.dry_run(theirs._lm_for(model, tok))
    got, want = mine.score(model, tok), theirs.score(model, tok)
    assert got["items"]["mine"] == want["items"]["zoo_shift_search"] and len(got["items"]["mine"]) == 30
    assert got["fitness"] == want["fitness"] == base["mine"]
    # subsets (racing chunks, IRT anchors): exactly the items asked for, in that order
    sub = mine.score_lm(mine._lm_for(model, tok), samples={"mine": [7, 2, 11]})
    assert sub["items"]["mine"] == [want["items"]["zoo_shift_search"][i] for i in (7, 2, 11)]
    # a function without `items` is called for every item and the subset taken from its answer
    plain = tmp_path / "plain.py"
    plain.write_text(fn.read_text().replace("def score(model, tokenizer, items=None):",
                                            "def score(model, tokenizer):\n    items = None"))
    noitems = Scorer([{"name": "mine", "function": f"{plain}:score"}], limit=10)
    assert noitems.score(model, tok)["items"]["mine"] == want["items"]["zoo_shift_search"][:10]
    assert noitems.score_lm(noitems._lm_for(model, tok), samples={"mine": [7, 2]})["items"]["mine"] == [
        want["items"]["zoo_shift_search"][i] for i in (7, 2)]
    # racing works on it like on an lm-eval task
    raced = mine.race(mine._lm_for(model, tok), threshold=1.1, chunks=3, delta=0.05)
    assert raced["raced"] and raced["items_scored"] < 30


def test_a_function_mixed_with_lm_eval_tasks_and_weights(micro_zoo, base_model, tmp_path):
    from workers.score import Scorer

    fn = write_fn(tmp_path / "greedy.py", micro_zoo)
    model, tok = base_model
    sc = Scorer([{"name": "zoo_mixed_search", "weight": 3}, {"name": "mine", "function": f"{fn}:score"}],
                [str(micro_zoo / "tasks")], limit=30)
    res = sc.score(model, tok)
    assert set(res["items"]) == {"zoo_mixed_search", "mine"}
    assert res["fitness"] == pytest.approx((3 * res["metrics"]["zoo_mixed_search"] + res["metrics"]["mine"]) / 4)


BROKEN = [
    ("missing module", "no_such_module_xyz:score", None, "no module named 'no_such_module_xyz'"),
    ("missing file", "{tmp}/nope.py:score", None, "file {tmp}/nope.py not found"),
    ("missing function", "{tmp}/f.py:scor", "def score(model):\n    return [1.0]\n",
     "has no 'scor' (did you mean 'score'?)"),
    ("not callable", "{tmp}/f.py:score", "score = 3\n", "'score' is a int, not a function"),
    ("import fails", "{tmp}/f.py:score", "import no_such_dep_xyz\ndef score(model):\n    return [1.0]\n",
     "importing {tmp}/f.py raised ModuleNotFoundError"),
    ("unknown required argument", "{tmp}/f.py:score", "def score(model, dataset):\n    return [1.0]\n",
     "required argument 'dataset' is not one evomerge gives"),
]


@pytest.mark.parametrize("label,spec,body,fragment", BROKEN, ids=[b[0] for b in BROKEN])
def test_a_function_that_cannot_be_loaded_is_named_with_the_reason(label, spec, body, fragment, tmp_path):
    from workers.user_function import load_function

    if body is not None:
        (tmp_path / "f.py").write_text(body)
    with pytest.raises(EvomergeError) as e:
        load_function(spec.format(tmp=tmp_path))
    assert fragment.format(tmp=tmp_path) in e.value.problem, e.value.problem


BAD_RESULTS = [
    ("raises", "raise ValueError('no GPU here')", "raised ValueError: no GPU here"),
    ("above 1", "return [0.5, 1.5]", "returned 1.5 for item 1: every score must be a number in [0, 1]"),
    ("below 0", "return [-0.1]", "returned -0.1 for item 0"),
    ("nan", "return [float('nan')]", "returned nan for item 0"),
    ("a number", "return 0.7", "returned a float: it must return a list of per-item scores"),
    ("a dict", "return {'acc': 0.7}", "returned a dict"),
    ("nothing", "return []", "returned no scores"),
    ("text", "return ['yes']", "returned 'yes' for item 0"),
]


@pytest.mark.parametrize("label,line,fragment", BAD_RESULTS, ids=[b[0] for b in BAD_RESULTS])
def test_a_broken_function_stops_at_the_dry_call_with_a_clear_error(label, line, fragment, base_model, tmp_path):
    from workers.score import Scorer

    (tmp_path / "f.py").write_text(f"def score(model, tokenizer):\n    {line}\n")
    model, tok = base_model
    sc = Scorer([{"name": "mine", "function": f"{tmp_path}/f.py:score"}])
    with pytest.raises(EvomergeError) as e:
        sc.dry_run(sc._lm_for(model, tok))
    assert fragment in e.value.problem and "dry call on the base model" in e.value.problem, e.value.problem
    assert f"{tmp_path}/f.py:score" in e.value.problem


def test_a_function_whose_item_count_changes_is_an_error(base_model, tmp_path):
    from workers.score import Scorer

    (tmp_path / "f.py").write_text("N = [3]\ndef score(model):\n    N[0] += 1\n    return [1.0] * N[0]\n")
    model, tok = base_model
    sc = Scorer([{"name": "mine", "function": f"{tmp_path}/f.py:score"}])
    sc.dry_run(sc._lm_for(model, tok))
    with pytest.raises(RuntimeError, match="returned 5 scores; it returned 4 on the base model"):
        sc.score(model, tok)


def test_the_default_loads_no_code_and_a_named_function_only_when_imported(micro_zoo, tmp_path):
    from evomerge.run.config import parse_config
    from workers.eval_options import import_functions

    marker = tmp_path / "ran"
    (tmp_path / "f.py").write_text(f"open({str(marker)!r}, 'w').write('x')\ndef score(model):\n    return [1.0]\n")
    d = {"models": {n: str(micro_zoo / "models" / n) for n in ("base", "shift")}, "base": "base",
         "space": {"method": "linear"}, "objective": {"include_path": str(micro_zoo / "tasks"),
                                                       "tasks": [{"name": "zoo_mixed_search"}]}}
    before = {m for m in sys.modules if m.startswith("evomerge_user_")}
    assert import_functions(parse_config(d, tmp_path)) == {}
    assert {m for m in sys.modules if m.startswith("evomerge_user_")} == before and not marker.exists()
    d["objective"]["function"] = "f.py:score"  # relative to the config's folder
    cfg = parse_config(d, tmp_path)
    assert [t.function for t in cfg.objective.tasks] == [None, f"{tmp_path}/f.py:score"]
    assert [t.name for t in cfg.objective.tasks] == ["zoo_mixed_search", "score"]
    assert not marker.exists()  # loading a config runs nothing
    assert list(import_functions(cfg)) == [f"{tmp_path}/f.py:score"] and marker.exists()


def search_config(zoo, fn_spec, **over):
    d = {"models": {n: str(zoo / "models" / n) for n in ("base", "shift", "mirror")}, "base": "base",
         "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]}, "x0": 0.5},
         "objective": {"function": fn_spec}, "optimizer": {"seed": 0, "budget": 5, "popsize": 3, "sigma0": 0.3},
         "workers": {"count": 1, "cpus": 1}}
    d.update(over)
    return d


def test_search_with_a_function_objective_racing_and_a_failure_recorded(micro_zoo, ray_local, tmp_path):
    """Runs in the Ray worker; the dry call on the base model is call 1, the first candidate's call (2)
    raises: that candidate is recorded as failed with the function's error, the rest are raced."""
    from evomerge.run.config import parse_config
    from evomerge.run.controller import Controller
    from evomerge.run.rundir import RunDir

    (tmp_path / "fns").mkdir()
    write_fn(tmp_path / "fns" / "greedy.py", micro_zoo, hook="if CALLS == 2: raise RuntimeError('flaky judge')")
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    d = search_config(micro_zoo, "../fns/greedy.py:score")
    d["objective"]["racing"] = {"chunks": 3, "delta": 0.2}
    cfg = parse_config(d, cfg_dir)
    st = Controller(cfg, tmp_path / "run", progress=False).run()
    evals = sorted((r for r in RunDir(tmp_path / "run").records() if r["type"] == "eval"), key=lambda r: r["id"])
    assert st["evaluations"] == 5 and st["failures"] == 1
    assert "scoring function" in evals[0]["error"] and "flaky judge" in evals[0]["error"]
    ok = [r for r in evals if r["error"] is None]
    assert all(set(r["items"]) == {"score"} for r in ok)
    full = [r for r in ok if not r["raced"]]
    assert full and all(len(r["items"]["score"]) == 30 for r in full)
    assert all(r["fitness"] == pytest.approx(sum(r["items"]["score"]) / len(r["items"]["score"])) for r in ok)


def test_a_function_broken_on_the_base_model_stops_the_search_before_any_evaluation(micro_zoo, ray_local, tmp_path):
    from evomerge.run.config import parse_config
    from evomerge.run.controller import Controller

    (tmp_path / "f.py").write_text("def score(model, tokenizer):\n    return [2.0, 0.5]\n")
    cfg = parse_config(search_config(micro_zoo, "f.py:score"), tmp_path)
    with pytest.raises(EvomergeError) as e:
        Controller(cfg, tmp_path / "run", progress=False).run()
    assert "returned 2.0 for item 0" in str(e.value) and "dry call on the base model" in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()  # refused before recording anything: no trace
    (tmp_path / "g.py").write_text("import json\n")  # and a missing function is refused before any worker starts
    cfg = parse_config(search_config(micro_zoo, "g.py:score"), tmp_path)
    with pytest.raises(EvomergeError, match="has no 'score'"):
        Controller(cfg, tmp_path / "run2", progress=False).run()


def test_m2n2_competes_on_the_functions_per_item_scores(micro_zoo, ray_local, tmp_path):
    from evomerge.run.config import parse_config
    from evomerge.run.controller import Controller
    from evomerge.run.rundir import RunDir

    write_fn(tmp_path / "greedy.py", micro_zoo, limit=20)
    d = search_config(micro_zoo, "greedy.py:score", search="m2n2",
                      m2n2={"seeds": ["shift", "mirror"], "archive_size": 4})
    d.pop("space")
    d["optimizer"] = {"seed": 0, "budget": 4}
    st = Controller(parse_config(d, tmp_path), tmp_path / "run", progress=False).run()
    evals = [r for r in RunDir(tmp_path / "run").records() if r["type"] == "eval"]
    assert st["evaluations"] == 4 and st["failures"] == 0, [r["error"] for r in evals]
    assert all(len(r["items"]["score"]) == 20 for r in evals)
    json.dumps(evals)  # recorded as plain data


def test_irt_estimates_score_the_functions_anchor_items(micro_zoo, ray_local, tmp_path):
    from evomerge.run.config import parse_config
    from evomerge.run.controller import Controller
    from evomerge.run.rundir import RunDir

    write_fn(tmp_path / "greedy.py", micro_zoo, limit=20)
    d = search_config(micro_zoo, "greedy.py:score")
    d["objective"]["estimate"] = {"items": 6, "calibration": 3}
    d["optimizer"] = {"seed": 0, "budget": 6, "popsize": 3, "sigma0": 0.3}
    st = Controller(parse_config(d, tmp_path), tmp_path / "run", progress=False).run()
    recs = RunDir(tmp_path / "run").records()
    evals = sorted((r for r in recs if r["type"] == "eval"), key=lambda r: r["id"])
    assert st["evaluations"] == 6 and st["failures"] == 0, [r["error"] for r in evals]
    assert any(r["type"] == "irt" for r in recs)
    estimated = [r for r in evals if r.get("estimated")]
    assert estimated and all(len(r["items"]["score"]) == 6 and r["sampled"]["score"] for r in estimated)
    assert all(len(r["items"]["score"]) == 20 for r in evals[:3])  # the calibration scored every item


def test_evomerge_check_imports_the_function(micro_zoo, tmp_path):
    import os
    import subprocess

    (tmp_path / "f.py").write_text("def score(model):\n    return [1.0]\n")
    d = search_config(micro_zoo, "f.py:scor")
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(d))
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "check", str(p)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 2 and "has no 'scor' (did you mean 'score'?)" in res.stderr, res.stdout + res.stderr
    d["objective"]["function"] = "f.py:score"
    p.write_text(yaml.safe_dump(d))
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "check", str(p)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0 and "scoring function(s) imported" in res.stdout, res.stdout + res.stderr
