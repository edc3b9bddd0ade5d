"""Shared by the zoo search benchmarks: run a shipped config on a zoo, read its curve, score on the test split,
plot curves."""

from __future__ import annotations

from pathlib import Path

from _common import REPO

TEST_TASKS = ["zoo_mixed_test", "zoo_shift_test", "zoo_mirror_test", "zoo_compositional_test"]


def ensure_zoo(zoo: Path, size: str = "small") -> Path:
    zoo = zoo.resolve()
    if not (zoo / "zoo.json").exists():
        from evomerge.zoo.build import build_zoo

        build_zoo(zoo, size, seed=0)
    return zoo


def zoo_config(cfg_file: str, zoo: Path, **override):
    """A shipped config pointed at `zoo` (models and task folders), with top-level overrides."""
    from evomerge.run.config import load_config

    cfg = load_config(REPO / cfg_file)
    models = {n: str(zoo / "models" / Path(p).name) for n, p in cfg.models.items()}
    upd = {"models": models,
           "objective": cfg.objective.model_copy(update={"include_path": [str(zoo / "tasks")]})}
    if cfg.validation is not None:
        upd["validation"] = cfg.validation.model_copy(update={"include_path": [str(zoo / "tasks")]})
    return cfg.model_copy(update={**upd, **override})


def curve(run_dir: Path) -> list[float]:
    """Best search fitness so far, per evaluation (in id order)."""
    from evomerge.run.rundir import RunDir

    evals = sorted((r for r in RunDir(run_dir).records() if r["type"] == "eval"), key=lambda r: r["id"])
    best, out = float("-inf"), []
    for r in evals:
        if r["fitness"] is not None:
            best = max(best, r["fitness"])
        out.append(best)
    return out


class TestScorer:
    """Accuracy on the zoo's test tasks, for model objects or directories."""

    def __init__(self, zoo: Path, tokenizer_dir: Path):
        from transformers import AutoTokenizer

        from workers.score import Scorer

        self.tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.scorer = Scorer([{"name": t, "metric": "acc"} for t in TEST_TASKS], [str(zoo / "tasks")])

    def __call__(self, model) -> dict[str, float]:
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoModelForCausalLM

        if isinstance(model, (str, Path)):
            model = AutoModelForCausalLM.from_pretrained(model)
        return self.scorer.score_lm(HFLM(pretrained=model, tokenizer=self.tok, batch_size=64))["metrics"]


def plot_curves(curves: dict[str, list[float]], png: Path, styles: dict | None = None, marks=()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=label, **(styles or {}).get(label, {}))
    lo = min(y for v in curves.values() for y in v if y == y)
    for x, text in marks:
        ax.axvline(x + 0.5, color="0.8", ls="--", lw=1)
        ax.text(x + 1, lo, text, fontsize=7, color="0.4")
    ax.set_xlabel("evaluations")
    ax.set_ylabel("best fitness so far (zoo_mixed_search)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
