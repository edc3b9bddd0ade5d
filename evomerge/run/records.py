"""Reading a run's ledger records: its budget, the best record (by validation where there is one), the Pareto front,
estimated candidates with their full re-scores."""

from __future__ import annotations

from typing import Any


def budget_of(cfg) -> int:
    if cfg.search == "dataflow" and cfg.dataflow and cfg.dataflow.budget:
        return cfg.dataflow.budget
    return cfg.optimizer.budget


def with_rescores(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The eval records, an estimated one (objective.estimate) that was re-scored on every item carrying that
    full score (its estimate kept as `estimate`)."""
    full = {r["id"]: r for r in records if r["type"] == "rescore" and r.get("fitness") is not None}
    out = []
    for r in records:
        if r["type"] != "eval":
            continue
        if r.get("estimated") and r["id"] in full:
            q = full[r["id"]]
            r = {**r, "fitness": q["fitness"], "metrics": q["metrics"], "estimated": False, "estimate": r["fitness"]}
        out.append(r)
    return out


def best_record(evals: list[dict[str, Any]], validations: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The best evaluation: by validation score where there is one, else by fitness. Raced candidates (their
    scoring stopped early) and estimated ones not re-scored on every item never count."""
    ok = [r for r in evals if r["fitness"] is not None and not r.get("raced") and not r.get("estimated")]
    if not ok:
        return None
    validated = [r for r in ok if validations.get(r["id"], {}).get("fitness") is not None]
    if validated:
        return max(validated, key=lambda r: (validations[r["id"]]["fitness"], r["fitness"]))
    return max(ok, key=lambda r: r["fitness"])


def pareto_front(evals: list[dict[str, Any]], tasks: list[str]) -> list[dict[str, Any]]:
    """The evaluations no other evaluation beats on every task (ties kept once), best mean score first."""
    ok = [r for r in evals if r["fitness"] is not None]
    vecs = {r["id"]: [r["metrics"][t] for t in tasks] for r in ok}

    def dominated(a: list[float], b: list[float]) -> bool:  # b dominates a
        return all(y >= x for x, y in zip(a, b, strict=True)) and any(y > x for x, y in zip(a, b, strict=True))

    front, seen = [], set()
    for r in ok:
        v = vecs[r["id"]]
        if tuple(v) in seen or any(dominated(v, vecs[o["id"]]) for o in ok):
            continue
        seen.add(tuple(v))
        front.append(r)
    front.sort(key=lambda r: -sum(vecs[r["id"]]) / len(tasks))
    return [{"id": r["id"], "metrics": r["metrics"], "fitness": r["fitness"], "recipe": r["recipe"]} for r in front]


def score_of(best: dict[str, Any]) -> float:
    return best["validation"] if best.get("validation") is not None else best["fitness"]
