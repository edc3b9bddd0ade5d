"""The search service end to end on the micro zoo: Ray workers, lm-eval scoring, ledger, resume, faults."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.run.config import parse_config
from evomerge.run.controller import Controller
from evomerge.run.rundir import RunDir, read_ledger
from evomerge.run.status import status


def config(zoo, **over):
    d = {
        "models": {"base": str(zoo / "models/base"), "shift": str(zoo / "models/shift"),
                   "mirror": str(zoo / "models/mirror")},
        "base": "base",
        "space": {"method": "task_arithmetic", "search": ["weight"], "bounds": {"weight": [0.0, 1.5]}, "x0": 0.5},
        "objective": {"include_path": str(zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search", "metric": "acc"}],
                      "limit": 40},
        "optimizer": {"seed": 0, "budget": 8, "popsize": 4, "sigma0": 0.3},
        "workers": {"count": 2, "cpus": 1, "batch_size": 64},
    }
    for k, v in over.items():
        d[k] = {**d[k], **v} if isinstance(v, dict) and isinstance(d.get(k), dict) else v
    return parse_config(d, zoo)


def evals_of(run_dir):
    return {r["id"]: r for r in RunDir(run_dir).records() if r["type"] == "eval"}


def test_search_end_to_end_with_validation_status_and_export(micro_zoo, ray_local, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = config(micro_zoo, validation={"include_path": [str(micro_zoo / "tasks")], "limit": 40,
                                        "tasks": [{"name": "zoo_mixed_validation", "metric": "acc"}]})
    st = Controller(cfg, tmp_path / "run", progress=False).run()
    ev = evals_of(tmp_path / "run")
    assert sorted(ev) == list(range(8)) and st["evaluations"] == 8 and st["failures"] == 0
    for r in ev.values():
        assert len(r["items"]["zoo_mixed_search"]) == 40
        assert r["fitness"] == pytest.approx(sum(r["items"]["zoo_mixed_search"]) / 40)
        assert r["t_build"] > 0 and r["t_score"] > 0
    vals = [r for r in RunDir(tmp_path / "run").records() if r["type"] == "validation"]
    assert vals and st["best"]["validation"] is not None
    js = json.loads(subprocess.run([sys.executable, "-m", "evomerge.cli", "status", str(tmp_path / "run"), "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert {"evaluations", "budget", "failures", "best"} <= set(js)
    assert js["best"]["recipe"]["method"] == "task_arithmetic"
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "export", str(tmp_path / "run"), "--out",
                          str(tmp_path / "best")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "validation" in (tmp_path / "best" / "README.md").read_text()
    assert "merge_method: task_arithmetic" in (tmp_path / "best.mergekit.yml").read_text()
    AutoModelForCausalLM.from_pretrained(tmp_path / "best")


def test_resume_after_a_torn_ledger_gives_the_same_ledger(micro_zoo, ray_local, tmp_path):
    cfg = config(micro_zoo, workers={"count": 1})
    Controller(cfg, tmp_path / "a", progress=False).run()
    full = evals_of(tmp_path / "a")
    # simulate a controller killed mid-write: keep 5 records and half of the 6th
    ledger = tmp_path / "a" / "ledger.jsonl"
    lines = ledger.read_bytes().split(b"\n")
    ledger.write_bytes(b"\n".join(lines[:5]) + b"\n" + lines[5][: len(lines[5]) // 2])
    assert len(read_ledger(ledger)[0]) == 5
    Controller(cfg, tmp_path / "a", resume=True, progress=False).run()
    again = evals_of(tmp_path / "a")
    assert sorted(again) == sorted(full)
    for i in full:
        assert (again[i]["x"], again[i]["fitness"], again[i]["items"]) == (full[i]["x"], full[i]["fitness"],
                                                                           full[i]["items"])


def test_kill_9_of_the_controller_then_resume(micro_zoo, tmp_path):
    cfg_path = tmp_path / "search.yaml"
    d = yaml.safe_load(config(micro_zoo, optimizer={"budget": 12}, workers={"count": 1}).to_yaml())
    cfg_path.write_text(yaml.safe_dump(d))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(cfg_path), "--run-dir",
                             str(tmp_path / "run"), "-q"], env=env, start_new_session=True)
    ledger = tmp_path / "run" / "ledger.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not ledger.exists() or len(read_ledger(ledger)[0]) < 3):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(read_ledger(ledger)[0])
    assert 3 <= killed_at < 12
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "resume", str(tmp_path / "run"), "-q"], env=env,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    ev = evals_of(tmp_path / "run")
    assert sorted(ev) == list(range(12))  # each evaluation exactly once
    records = [r for r in RunDir(tmp_path / "run").records() if r["type"] == "eval"]
    assert len(records) == 12


def test_worker_death_is_retried_and_a_raising_candidate_is_recorded(micro_zoo, ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_TEST_FAULTS", "kill:2,raise:5")
    st = Controller(config(micro_zoo), tmp_path / "run", progress=False).run()
    ev = evals_of(tmp_path / "run")
    assert sorted(ev) == list(range(8))
    assert ev[2]["attempt"] == 1 and ev[2]["fitness"] is not None  # redone on a fresh worker
    assert ev[5]["fitness"] is None and "injected fault" in ev[5]["error"]
    assert st["failures"] == 1


def test_hanging_candidate_times_out(micro_zoo, ray_local, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_TEST_FAULTS", "hang:1")
    cfg = config(micro_zoo, optimizer={"budget": 4}, workers={"timeout_s": 20})
    Controller(cfg, tmp_path / "run", progress=False).run()
    ev = evals_of(tmp_path / "run")
    assert sorted(ev) == [0, 1, 2, 3] and "timed out" in ev[1]["error"]


def test_second_controller_on_the_same_run_dir_is_refused(micro_zoo, ray_local, tmp_path):
    cfg = config(micro_zoo)
    rd = RunDir(tmp_path / "run")
    rd.lock()
    try:
        with pytest.raises(EvomergeError, match="another controller"):
            Controller(cfg, tmp_path / "run", progress=False).run()
    finally:
        rd.unlock()


def test_resume_refuses_a_changed_config(micro_zoo, ray_local, tmp_path):
    cfg = config(micro_zoo, optimizer={"budget": 4})
    Controller(cfg, tmp_path / "run", progress=False).run()
    with pytest.raises(EvomergeError, match="already holds a search"):
        Controller(cfg, tmp_path / "run", progress=False)
    changed = config(micro_zoo, optimizer={"budget": 4, "sigma0": 0.1})
    with pytest.raises(EvomergeError, match="differs"):
        Controller(changed, tmp_path / "run", resume=True, progress=False)
    more = config(micro_zoo, optimizer={"budget": 6})  # only the budget: allowed
    Controller(more, tmp_path / "run", resume=True, progress=False).run()
    assert status(tmp_path / "run")["evaluations"] == 6


@pytest.mark.parametrize("mutate,fragment", [
    (lambda d: d.update(bogus=1), "bogus"),
    (lambda d: d.update(base="nope"), "base 'nope'"),
    (lambda d: d["space"].update(method="tie"), "unknown merge method 'tie'"),
    (lambda d: d["objective"]["tasks"][0].update(name="zoo_nothing"), "task(s) not found: zoo_nothing"),
    (lambda d: d["models"].update(shift="/does/not/exist"), "does not exist"),
    (lambda d: d["optimizer"].update(budget=0), "optimizer.budget"),
    (lambda d: d["workers"].update(count=8), "the workers ask for 8 CPUs"),
])
def test_bad_search_configs(micro_zoo, ray_local, tmp_path, mutate, fragment):
    d = yaml.safe_load(config(micro_zoo).to_yaml())
    mutate(d)
    with pytest.raises(EvomergeError) as e:
        Controller(parse_config(d, tmp_path), tmp_path / "run", progress=False).run()
    assert fragment in str(e.value)


def test_ledger_keeps_the_order_of_mappings(tmp_path):
    """A recipe's model order is part of its meaning (reference model, tie-breaking, coefficient order)."""
    rd = RunDir(tmp_path / "run")
    rd.lock()
    try:
        rd.open_ledger()
        rd.append({"type": "eval", "id": 0, "recipe": {"models": {"zeta": {}, "alpha": {}, "mid": {}}}})
        rd.sync()
    finally:
        rd.unlock()
    (rec,) = RunDir(tmp_path / "run").records()
    assert list(rec["recipe"]["models"]) == ["zeta", "alpha", "mid"]
