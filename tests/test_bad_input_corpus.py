"""The bad-input corpus: every file in tests/bad_inputs/ is one broken config, recipe, mergekit YAML, model
directory or run directory, with the command a user would run on it and a fragment of the message they must
get. Each must end with exit code 2, that message and a `fix:` line, no traceback, and nothing written or
changed on disk.

Case format (YAML): `about`, `command` (evomerge's arguments), `expect`, and optionally `keeps` (a run
directory the command may leave: a search that started and recorded only failures stays resumable once the
cause is fixed), `isolated: true` (run the command in its own process: it starts Ray), `setup` (actions
that build the broken inputs in the case's folder), `config` (a mapping written to {cfg}), `text` (raw text
written to {cfg}), or `template: search` with `set` (dotted keys; null deletes) for search configs.
Placeholders: {base} {e1} {e2} (a tiny Llama family), {zbase} {zshift} {zmirror} {ztasks} (the micro zoo),
{tmp} (the case's folder), {cfg}, {out}, {run}.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.errors import EvomergeError

CASES = sorted((Path(__file__).parent / "bad_inputs").glob("*.yaml"))
SEARCH = {"models": {"base": "{zbase}", "shift": "{zshift}", "mirror": "{zmirror}"}, "base": "base",
          "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]}},
          "objective": {"include_path": ["{ztasks}"], "tasks": [{"name": "zoo_mixed_search"}], "limit": 10},
          "optimizer": {"budget": 2, "popsize": 2}, "workers": {"count": 1, "cpus": 1}}


def test_the_corpus_is_large_and_every_case_is_well_formed():
    assert len(CASES) >= 40
    for path in CASES:
        case = yaml.safe_load(path.read_text())
        assert {"about", "command", "expect"} <= set(case), path.name


def _subst(obj, env):
    if isinstance(obj, str):
        return re.sub(r"\{(\w+)\}", lambda m: str(env[m.group(1)]) if m.group(1) in env else m.group(0), obj)
    if isinstance(obj, list):
        return [_subst(v, env) for v in obj]
    if isinstance(obj, dict):
        return {k: _subst(v, env) for k, v in obj.items()}
    return obj


def _set(d, dotted, value):
    *path, last = dotted.split(".")
    for k in path:
        d = d.setdefault(k, {})
    if value is None:
        d.pop(last, None)
    else:
        d[last] = value


def _edit_tensors(model_dir, fn):
    (f,) = sorted(Path(model_dir).glob("*.safetensors"))
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def _fake_run(tmp, kind, env):
    """A run directory as a search leaves it: config.yaml and a ledger (none, failed or one good record)."""
    from evomerge.run.config import parse_config
    from evomerge.run.rundir import _encode
    from evomerge.run.spaces import make_space

    run = tmp / "run"
    run.mkdir()
    cfg = parse_config(_subst(SEARCH, env), tmp)
    from evomerge.run.rundir import RunDir

    RunDir(run).write_config(cfg.to_yaml())  # config.yaml and its checksum record, as a search writes them
    recipe = make_space(cfg).to_recipe(make_space(cfg).x0).to_dict()
    base = {"type": "eval", "x": [0.5, 0.5], "recipe": recipe, "items": None, "worker": None, "attempt": 0,
            "requeued": 0, "t_build": None, "t_score": None, "t_wall": 1.0, "time": 0.0}
    if kind == "failed":
        recs = [{**base, "id": i, "fitness": None, "metrics": None, "error": "RuntimeError: boom"} for i in range(2)]
    elif kind == "ok":
        recs = [{**base, "id": 0, "fitness": 0.5, "metrics": {"zoo_mixed_search": 0.5}, "error": None}]
    else:
        recs = []
    if recs:
        (run / "ledger.jsonl").write_text("".join(_encode(r) for r in recs))


def _setup(actions, tmp, env, family, zoo):
    for a in actions:
        if "copy" in a:
            shutil.copytree(family[a["copy"]], tmp / a["to"])
        elif "copy_zoo" in a:
            shutil.copytree(zoo / "models" / a["copy_zoo"], tmp / a["to"])
        elif "mkdir" in a:
            (tmp / a["mkdir"]).mkdir(parents=True, exist_ok=True)
        elif "write" in a:
            (tmp / a["write"]).parent.mkdir(parents=True, exist_ok=True)
            (tmp / a["write"]).write_text(_subst(a["text"], env))
        elif "remove" in a:
            (tmp / a["remove"]).unlink()
        elif "json" in a:
            p = tmp / a["json"]
            p.write_text(json.dumps({**json.loads(p.read_text()), **a["set"]}))
        elif "yaml" in a:
            p = tmp / a["yaml"]
            d = yaml.safe_load(p.read_text())
            d.pop(a["delete"])
            p.write_text(yaml.safe_dump(d))
        elif "truncate" in a:
            p = tmp / a["truncate"]
            p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
        elif "garbage" in a:
            p = tmp / a["garbage"]
            p.write_bytes(torch.randint(0, 256, (p.stat().st_size,), generator=torch.Generator().manual_seed(0))
                          .to(torch.uint8).numpy().tobytes())
        elif "pickle_only" in a:
            d = tmp / a["pickle_only"]
            tensors = load_file(d / "model.safetensors")
            (d / "model.safetensors").unlink()
            torch.save(tensors, d / "pytorch_model.bin")  # written here, never loaded by evomerge
        elif "reshape" in a:
            def grow(t, name=a["tensor"]):
                t[name] = torch.zeros(t[name].shape[0] + 1, *t[name].shape[1:])
            _edit_tensors(tmp / a["reshape"], grow)
        elif "drop" in a:
            _edit_tensors(tmp / a["drop"], lambda t, name=a["tensor"]: t.pop(name))
        elif "nan" in a:
            def poison(t, name=a["tensor"]):
                t[name] = t[name].clone()
                t[name][0, 0] = float("nan")
            _edit_tensors(tmp / a["nan"], poison)
        elif "header_shape" in a:  # a header whose data offsets are shorter than the shape's byte size
            p = tmp / a["header_shape"]
            data = p.read_bytes()
            n = int.from_bytes(data[:8], "little")
            header = json.loads(data[8:8 + n])
            header[a["tensor"]]["shape"] = [header[a["tensor"]]["shape"][0] * 2, *header[a["tensor"]]["shape"][1:]]
            raw = json.dumps(header).encode()
            p.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])
        elif "run" in a:
            _fake_run(tmp, a["run"], env)
        else:
            raise AssertionError(f"unknown setup action {a}")


def _tree(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_bad_input(path, family, micro_zoo, tmp_path, capsys, monkeypatch):
    from evomerge import cli

    case = yaml.safe_load(path.read_text())
    env = {"base": family["base"], "e1": family["expert1"], "e2": family["expert2"], "tmp": tmp_path,
           "zbase": micro_zoo / "models" / "base", "zshift": micro_zoo / "models" / "shift",
           "zmirror": micro_zoo / "models" / "mirror", "ztasks": micro_zoo / "tasks",
           "cfg": tmp_path / "case.yaml", "out": tmp_path / "out", "run": tmp_path / "run"}
    _setup(case.get("setup", []), tmp_path, env, family, micro_zoo)
    if "text" in case:
        env["cfg"].write_text(_subst(case["text"], env))
    elif "config" in case:
        env["cfg"].write_text(yaml.safe_dump(_subst(case["config"], env), sort_keys=False))
    elif case.get("template") == "search":
        cfg = json.loads(json.dumps(SEARCH))
        for k, v in case.get("set", {}).items():
            _set(cfg, k, v)
        env["cfg"].write_text(yaml.safe_dump(_subst(cfg, env), sort_keys=False))
    before = _tree(tmp_path)
    args = _subst(case["command"], env)
    if case.get("isolated"):  # it starts Ray, whose log handlers would outlive pytest's capture: own process
        res = subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True,
                             timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
        code, err = res.returncode, res.stderr
    else:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["evomerge", *args])
        with pytest.raises(SystemExit) as e:
            cli.main()
        code, err = e.value.code, capsys.readouterr().err
    assert code == 2, f"{case['about']}: exit {code}\n{err}"
    assert case["expect"].lower() in err.lower(), f"{case['about']}: expected '{case['expect']}' in:\n{err}"
    assert "fix:" in err and "Traceback" not in err and "internal error" not in err, err
    after = _tree(tmp_path)
    for kept in case.get("keeps", []):  # a search that ran and recorded its failures: a resumable run directory
        assert f"{kept}/config.yaml" in after and f"{kept}/ledger.jsonl" in after
        from evomerge.run.rundir import RunDir

        assert all(r["fitness"] is None for r in RunDir(tmp_path / kept).records() if r["type"] == "eval")
        after = {k: v for k, v in after.items() if k != kept and not k.startswith(f"{kept}/")}
    assert after == before, f"{case['about']}: something was written or changed"


_FRESH_CLI = """
import json, sys
import ray
from evomerge import cli
sys.argv = ["evomerge", *sys.argv[1:]]
try:
    cli.main()
    code = 0
except SystemExit as e:
    code = e.code
print("RESULT " + json.dumps({"code": code, "ray": ray.is_initialized()}))
"""


def _cli_in_a_fresh_process(*args) -> tuple[int, bool, str]:
    """(exit code, whether Ray is still up in that process when the command returns, output) of the CLI run
    in a process of its own, so no other test's Ray can be mistaken for one the command left behind."""
    res = subprocess.run([sys.executable, "-c", _FRESH_CLI, *map(str, args)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, res.stderr[-3000:]
    got = json.loads(line[len("RESULT "):])
    return got["code"], got["ray"], res.stdout + res.stderr


def test_a_refused_search_leaves_no_ray_running(micro_zoo, tmp_path):
    """A search refused after Ray started (more CPUs than there are) stops the Ray it started."""
    cfg = json.loads(json.dumps(SEARCH))
    cfg["workers"]["count"] = 64
    env = {"zbase": micro_zoo / "models" / "base", "zshift": micro_zoo / "models" / "shift",
           "zmirror": micro_zoo / "models" / "mirror", "ztasks": micro_zoo / "tasks"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(_subst(cfg, env)))
    code, ray_up, out = _cli_in_a_fresh_process("search", tmp_path / "c.yaml", "--run-dir", tmp_path / "run", "-q")
    assert code == 2 and "fix:" in out, out[-2000:]
    assert not ray_up and not (tmp_path / "run").exists()


# ---- issue 29: resume refuses a hand-edited config, does nothing when the budget is spent ----------------------
def _run_env(family, micro_zoo, tmp_path):
    return {"zbase": micro_zoo / "models" / "base", "zshift": micro_zoo / "models" / "shift",
            "zmirror": micro_zoo / "models" / "mirror", "ztasks": micro_zoo / "tasks", "tmp": tmp_path}


def _cli(monkeypatch, capsys, *args):
    from evomerge import cli

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["evomerge", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def test_resume_of_a_hand_edited_config_is_refused_with_the_diff(family, micro_zoo, tmp_path, monkeypatch, capsys):
    _fake_run(tmp_path, "ok", _run_env(family, micro_zoo, tmp_path))
    cfg_path = tmp_path / "run" / "config.yaml"
    d = yaml.safe_load(cfg_path.read_text())
    d["optimizer"]["sigma0"] = 0.3
    cfg_path.write_text(yaml.safe_dump(d, sort_keys=False))
    before = _tree(tmp_path)
    code, err = _cli(monkeypatch, capsys, "resume", tmp_path / "run", "--budget", "9", "-q")
    assert code == 2 and "was edited since the run was created" in err and "fix:" in err
    assert "optimizer.sigma0: 0.16666666666666666 -> 0.3" in err and "--budget N" in err
    assert _tree(tmp_path) == before  # the refused --budget was not written either
    from evomerge.run.rundir import RunDir

    d["optimizer"]["sigma0"] = 1 / 6  # put back, with the budget changed by hand: only the budget differs
    d["optimizer"]["budget"] = 7
    cfg_path.write_text(yaml.safe_dump(d, sort_keys=False))
    assert RunDir(tmp_path / "run").config_edits() == ["optimizer.budget: 2 -> 7"]
    from evomerge.run.status import check_resumable

    check_resumable(RunDir(tmp_path / "run"))  # a budget edit is allowed


def test_resume_of_a_finished_run_has_nothing_to_do(family, micro_zoo, tmp_path):
    _fake_run(tmp_path, "failed", _run_env(family, micro_zoo, tmp_path))  # 2 evaluations of a budget of 2
    before = _tree(tmp_path)
    code, ray_up, out = _cli_in_a_fresh_process("resume", tmp_path / "run", "-q")
    assert code == 0 and "nothing to do: the budget is spent" in out and "--budget N" in out
    assert not ray_up  # nothing to do: no Ray was started
    code, ray_up, out = _cli_in_a_fresh_process("resume", tmp_path / "run", "--budget", "2", "-q")
    assert code == 0 and "nothing to do" in out and not ray_up
    assert _tree(tmp_path) == before


def test_status_of_a_non_run_directory_does_not_suggest_a_flag_status_lacks(tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, "status", tmp_path)
    assert code == 2 and "fix:" in err and "--run-dir" not in err


def test_a_resume_refused_after_its_preflight_leaves_the_config_as_it_was(family, micro_zoo, tmp_path, monkeypatch):
    """The new budget of `resume --budget N` is written only once nothing can refuse the run any more (here Ray
    refuses it as it starts): a refused resume leaves config.yaml and its checksum record untouched."""
    from evomerge.errors import EvomergeError
    from evomerge.run.config import load_config
    from evomerge.run.controller import Controller
    from evomerge.run.pool import WorkerPool
    from evomerge.run.stage_layout import with_budget

    _fake_run(tmp_path, "ok", _run_env(family, micro_zoo, tmp_path))
    run = tmp_path / "run"
    before = _tree(run)

    def refuse(self):
        self._owns_ray = False
        raise EvomergeError("the workers ask for more CPUs than there are", "lower workers.count")

    monkeypatch.setattr(WorkerPool, "start", refuse)
    cfg = with_budget(load_config(run / "config.yaml"), run, 9)
    with pytest.raises(EvomergeError, match="more CPUs"):
        Controller(cfg, run, resume=True, progress=False).run()
    after = _tree(run)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    assert "budget: 2" in (run / "config.yaml").read_text()


def test_resume_accept_edits_takes_where_it_runs_and_records_it(family, micro_zoo, tmp_path, monkeypatch, capsys):
    """`resume --accept-edits`: an edit of where and how fast the search runs (worker count, timeout) is taken and
    recorded in the ledger as a `config_edit` record; an edit of what is searched is refused even with the flag;
    without the flag every edit is refused with a fix naming the flag."""
    from evomerge.run.config import load_config
    from evomerge.run.controller import Controller
    from evomerge.run.pool import WorkerPool
    from evomerge.run.rundir import RunDir
    from evomerge.run.status import check_resumable

    _fake_run(tmp_path, "ok", _run_env(family, micro_zoo, tmp_path))
    run = tmp_path / "run"
    cfg_path = run / "config.yaml"
    d = yaml.safe_load(cfg_path.read_text())
    d["workers"]["timeout_s"] = 1234.0
    d["optimizer"]["sigma0"] = 0.3
    cfg_path.write_text(yaml.safe_dump(d, sort_keys=False))
    before = _tree(tmp_path)
    code, err = _cli(monkeypatch, capsys, "resume", run, "--budget", "3", "-q")
    assert code == 2 and "--accept-edits" in err and "workers.timeout_s" in err
    code, err = _cli(monkeypatch, capsys, "resume", run, "--budget", "3", "--accept-edits", "-q")
    assert code == 2 and "optimizer.sigma0: 0.16666666666666666 -> 0.3" in err and "(these are not)" in err
    assert "workers.timeout_s" not in err.split("fix:")[0]  # the accepted edit is not listed as a problem
    assert _tree(tmp_path) == before

    d["optimizer"]["sigma0"] = 1 / 6  # only where it runs is edited now
    cfg_path.write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(EvomergeError, match="--accept-edits"):
        check_resumable(RunDir(run))
    accepted = check_resumable(RunDir(run), accept_edits=True)
    assert [e.split(":")[0] for e in accepted] == ["workers.timeout_s"]
    monkeypatch.setattr(WorkerPool, "start", lambda self: [])  # no worker: the loop has nothing to run
    monkeypatch.setattr(WorkerPool, "stop", lambda self: None)
    Controller(load_config(cfg_path), run, resume=True, progress=False).run()
    edits = [r for r in RunDir(run).records() if r["type"] == "config_edit"]
    assert len(edits) == 1 and edits[0]["changes"][0].startswith("workers.timeout_s:")
    assert RunDir(run).config_edits() == []  # the checksum now covers the edited config
    check_resumable(RunDir(run))


def test_a_refused_hybrid_resume_leaves_its_top_level_config_as_it_was(micro_zoo, tmp_path, monkeypatch):
    """A hybrid's top-level config (with the raised budget of `resume --budget`) is written only once a stage has
    passed every check that can refuse the run; a new hybrid refused at its start leaves no directory."""
    import ray

    from evomerge.run.config import parse_config
    from evomerge.run.pool import WorkerPool
    from evomerge.run.rundir import RunDir
    from evomerge.run.stage_layout import with_budget
    from evomerge.run.stages import run_search

    d = {"models": {n: str(micro_zoo / "models" / n) for n in ("base", "shift", "mirror")}, "base": "base",
         "search": "hybrid", "objective": {"include_path": str(micro_zoo / "tasks"),
                                           "tasks": [{"name": "zoo_mixed_search"}], "limit": 10},
         "optimizer": {"seed": 0, "budget": 2, "popsize": 2}, "workers": {"count": 1, "cpus": 1},
         "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]}},
         "dataflow": {"partners": ["mirror"], "budget": 2, "popsize": 2, "repeats": 2}}
    cfg = parse_config(d, tmp_path)

    def refuse(self):
        raise EvomergeError("the workers ask for more CPUs than there are", "lower workers.count")

    monkeypatch.setattr(WorkerPool, "start", refuse)
    monkeypatch.setattr(WorkerPool, "stop", lambda self: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # no Ray is started for the refusal
    with pytest.raises(EvomergeError, match="more CPUs"):
        run_search(cfg, tmp_path / "new", progress=False)
    assert not (tmp_path / "new").exists()

    run = tmp_path / "run"
    RunDir(run).path.mkdir()
    RunDir(run).write_config(cfg.to_yaml())  # a hybrid whose first stage never started
    before = _tree(run)
    with pytest.raises(EvomergeError, match="more CPUs"):
        run_search(with_budget(cfg, run, 9), run, resume=True, progress=False)
    after = _tree(run)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
