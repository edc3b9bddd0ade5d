"""The run report (evomerge/run/report/): built for parameter-space (with failures and baselines), data-flow, hybrid,
M2N2 and multi-objective searches on the micro zoo; refreshed and finalised by `evomerge search`; refused for
a bad run directory; viewable offline (rendered by headless Chromium where it is installed)."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.run.config import parse_config
from evomerge.run.report.data import load_run
from evomerge.run.report.figures import coverage_series
from evomerge.run.report.write import build_report
from evomerge.run.status import status


def base_config(zoo, **over):
    d = {
        "models": {n: str(zoo / "models" / n) for n in ("base", "shift", "mirror")}, "base": "base",
        "space": {"method": "task_arithmetic", "granularity": "layer", "search": ["weight"],
                  "bounds": {"weight": [0.0, 1.5]}, "x0": 0.5},
        "objective": {"include_path": str(zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search"}], "limit": 20},
        "optimizer": {"seed": 0, "budget": 8, "popsize": 4, "sigma0": 0.3},
        "workers": {"count": 2, "cpus": 1},
    }
    d.update(over)
    return d


def pictures(page: str) -> list[str]:
    return re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)


def offline(page: str) -> bool:
    """Nothing on the page is fetched from anywhere: no URLs in src/href, no scripts."""
    return not re.search(r'(src|href)="(?!data:|#)', page) and "<script" not in page


@pytest.fixture(scope="module")
def ps_run(micro_zoo, ray_local, tmp_path_factory):
    """A parameter-space search with a validation objective and two injected failures (one raising candidate,
    one worker that dies and is replaced)."""
    from evomerge.run.controller import Controller

    run = tmp_path_factory.mktemp("report") / "ps"
    cfg = parse_config(base_config(micro_zoo, validation={
        "include_path": str(micro_zoo / "tasks"), "limit": 20, "tasks": [{"name": "zoo_mixed_validation"}]}),
        micro_zoo)
    os.environ["EVOMERGE_TEST_FAULTS"] = "raise:3,kill:5"
    try:
        Controller(cfg, run, progress=False).run()
    finally:
        del os.environ["EVOMERGE_TEST_FAULTS"]
    return run


def test_parameter_search_report_with_failures_and_baselines(ps_run, tmp_path):
    page_path = build_report(ps_run, baselines=True)
    assert page_path == ps_run / "report" / "index.html"
    page = page_path.read_text()
    assert offline(page)
    for section in ("Summary", "Per-task scores", "Best recipe", "Config", "Commands", "Workers", "Failures (1)"):
        assert section in page
    assert set(pictures(page)) == {"tasks.png", "progress.png", "recipe.png", "workers.png", "time.png"}
    assert all((ps_run / "report" / p).stat().st_size > 1000 for p in pictures(page))
    assert "injected fault in candidate 3" in page  # the raising candidate, with its error
    assert "1 redone after their worker was lost" in page  # the candidate whose worker died
    assert "merge_method: task_arithmetic" in page  # the mergekit YAML
    assert f"evomerge resume {ps_run}" in page and f"evomerge export {ps_run} --out merged" in page
    # baselines: every source, the uniform average and the search's start, on objective and validation tasks
    cache = json.loads((ps_run / "baselines.json").read_text())
    labels = [r["label"] for r in cache["rows"]]
    assert labels[:3] == ["source: base", "source: shift", "source: mirror"]
    assert any("uniform average" in lab for lab in labels) and any("search start" in lab for lab in labels)
    assert all(set(r["metrics"]) == {"zoo_mixed_search", "zoo_mixed_validation"} for r in cache["rows"])
    assert "source: mirror" in page
    # a refresh reuses the cache and leaves no temporary files; status points at the page
    mtime = (ps_run / "baselines.json").stat().st_mtime_ns
    build_report(ps_run, baselines=True)
    assert (ps_run / "baselines.json").stat().st_mtime_ns == mtime
    assert not [p for p in ps_run.iterdir() if p.name.startswith(".report")]
    assert status(ps_run)["report"] == str(page_path)
    # another output directory, through the CLI
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "report", str(ps_run), "--out", str(tmp_path / "r"),
                          "-q"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == sorted(["index.html", *pictures(page)])


def test_heatmap_is_layer_group_by_model(ps_run):
    from evomerge.run.report.figures import heatmap_maps

    _, (stage,), st = load_run(ps_run)
    rec = next(r for r in stage.evals if r["id"] == st["best"]["id"])
    (weight,) = heatmap_maps(stage, rec)
    assert weight["param"] == "weight" and weight["cols"] == ["shift", "mirror"]
    assert weight["rows"] == ["embed", "layer 0", "layer 1", "head"]  # space.embed_head is on by default
    rules = {r.get("filter"): r["value"] for r in st["best"]["recipe"]["models"]["shift"]["parameters"]["weight"]}
    assert weight["values"][2][0] == pytest.approx(rules[None][1], abs=1e-5)
    assert weight["values"][0][0] == pytest.approx(rules["embed_tokens"], abs=1e-5)
    assert weight["values"][3][0] == pytest.approx(rules["lm_head"], abs=1e-5)


def test_bad_run_dirs_are_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(EvomergeError, match="does not exist"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "report", str(tmp_path / "empty")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "not a run directory" in res.stderr and "fix:" in res.stderr
    assert "Traceback" not in res.stderr
    assert list((tmp_path / "empty").iterdir()) == []  # no report directory, no temporary files


def test_a_failed_build_leaves_the_previous_report(ps_run, tmp_path, monkeypatch):
    import evomerge.run.report.page as page

    out = tmp_path / "r"
    build_report(ps_run, out)
    before = (out / "index.html").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(page, "section_tasks", boom)
    with pytest.raises(RuntimeError):
        build_report(ps_run, out)
    assert (out / "index.html").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".r")]


def test_dataflow_search_report_draws_the_path(micro_zoo, ray_local, tmp_path):
    from evomerge.run.stages import run_search

    d = base_config(micro_zoo, search="dataflow", space=None, base=None,
                    dataflow={"head": "shift", "partners": ["mirror"], "budget": 4, "popsize": 4, "repeats": 2})
    d["workers"] = {"count": 1, "cpus": 1}
    run_search(parse_config(d, micro_zoo), tmp_path / "run", progress=False)
    page = build_report(tmp_path / "run").read_text()
    assert {"progress.png", "path.png", "tasks.png"} <= set(pictures(page))
    assert "merge_method: passthrough" in page
    assert "model A alone: shift (evaluation #0)" in page  # a source the search scored itself


def test_hybrid_search_report_has_both_stages(micro_zoo, ray_local, tmp_path):
    from evomerge.run.stages import run_search

    d = base_config(micro_zoo, search="hybrid", dataflow={"partners": ["mirror"], "budget": 4, "popsize": 4,
                                                          "repeats": 2})
    d["optimizer"]["budget"] = 4
    d["workers"] = {"count": 1, "cpus": 1}
    run_search(parse_config(d, micro_zoo), tmp_path / "run", progress=False)
    page = build_report(tmp_path / "run").read_text()
    assert {"ps-progress.png", "ps-recipe.png", "dfs-progress.png", "dfs-path.png"} <= set(pictures(page))
    assert "stage 1: parameter space" in page and "stage 2: data-flow" in page


def test_m2n2_search_report_shows_archive_coverage(micro_zoo, ray_local, tmp_path):
    from evomerge.run.controller import Controller

    d = base_config(micro_zoo, search="m2n2", space=None, m2n2={"archive_size": 3, "blocks": 16})
    d["models"] = {n: str(micro_zoo / "models" / n) for n in ("shift", "mirror", "base")}
    d["optimizer"] = {"seed": 0, "budget": 7}
    del d["base"]
    Controller(parse_config(d, micro_zoo), tmp_path / "run", progress=False).run()
    page = build_report(tmp_path / "run").read_text()
    assert {"progress.png", "recipe.png", "archive.png"} <= set(pictures(page))
    assert "mergekit cannot express" in page
    assert "seed: shift (evaluation #0)" in page
    _, (stage,), _ = load_run(tmp_path / "run")
    series = coverage_series(stage)
    cov, best, anyone = series.values()
    assert len(cov) == 7 and all(0 <= b <= c <= a <= 1 for c, b, a in zip(cov, best, anyone, strict=True))


def test_multi_objective_search_report_shows_the_front(micro_zoo, ray_local, tmp_path):
    from evomerge.run.controller import Controller

    d = base_config(micro_zoo, objective={"include_path": str(micro_zoo / "tasks"), "multi": True, "limit": 20,
                                          "tasks": [{"name": "zoo_shift_search"}, {"name": "zoo_mirror_search"}]},
                    optimizer={"kind": "optuna", "sampler": "nsga2", "popsize": 4, "seed": 0, "budget": 6})
    Controller(parse_config(d, micro_zoo), tmp_path / "run", progress=False).run()
    page = build_report(tmp_path / "run").read_text()
    assert {"progress.png", "recipe.png", "pareto.png"} <= set(pictures(page))
    assert "Pareto front" in page and "--pick N --out merged" in page
    front = status(tmp_path / "run")["front"]
    assert f"#{front[0]['id']}" in page


def test_search_command_writes_the_report_and_status_points_to_it(micro_zoo, tmp_path):
    cfg = tmp_path / "search.yaml"
    d = base_config(micro_zoo)
    d["optimizer"]["budget"] = 4
    d["workers"] = {"count": 1, "cpus": 1}
    cfg.write_text(yaml.safe_dump(d))
    run = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(cfg), "--run-dir", str(run),
                          "--report-every", "1"], env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "report: " in res.stdout
    page = (run / "report" / "index.html").read_text()
    assert 'http-equiv="refresh"' not in page  # the final page: no more reloading
    assert "4 of 4 evaluations" in page
    js = json.loads(subprocess.run([sys.executable, "-m", "evomerge.cli", "status", str(run), "--json"],
                                   capture_output=True, text=True, check=True).stdout)
    assert os.path.samefile(js["report"], run / "report" / "index.html")


def test_live_refresh_page_reloads_itself(ps_run, tmp_path):
    from evomerge.run.report.write import Refresher

    out = build_report(ps_run, tmp_path / "live", live=True, refresh_s=30).read_text()
    assert '<meta http-equiv="refresh" content="30">' in out and "The search is running" in out
    shutil.rmtree(ps_run / "report", ignore_errors=True)
    with Refresher(ps_run, every=0.1) as rep:
        pass  # nothing changed since the start: the final build alone
    assert rep.path == ps_run / "report" / "index.html" and rep.error is None


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium is not installed")
def test_report_renders_in_headless_chromium(ps_run, tmp_path):
    from PIL import Image

    page = build_report(ps_run, tmp_path / "r")
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 2400)
    lo, hi = img.getextrema()
    assert hi - lo > 100  # something was drawn (not a blank page)
