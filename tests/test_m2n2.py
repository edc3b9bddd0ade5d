"""M2N2: competition, attraction, crossover and archive update against hand-computed examples; determinism
with several children in flight; resume by replay."""

import math

import numpy as np
import pytest

from evomerge.search.optimizers.m2n2 import M2N2, VectorAlgebra, attraction, shared_fitness, slerp_coefficients


def test_competition_matches_hand_computed_fitness_sharing():
    S = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    F, f = shared_fitness(S, alpha=1.0)
    np.testing.assert_allclose(F, [[0.5, 1, 0, 0], [0.5, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(f, [1.5, 1.5, 1.0])
    _, f0 = shared_fitness(S, alpha=0.0)  # alpha 0: no sharing (the reference's GA)
    np.testing.assert_allclose(f0, [2, 2, 1])
    # real-valued scores: capacity c_j = max_i s_ij
    F, f = shared_fitness(np.array([[0.5, 0.2], [0.25, 0.0]]), alpha=1.0)
    np.testing.assert_allclose(F, [[0.5 * 0.5 / 0.75, 0.2], [0.25 * 0.5 / 0.75, 0.0]], rtol=1e-6)
    # an item nobody solves gives nobody anything (no division by zero)
    F, f = shared_fitness(np.zeros((2, 3)), alpha=1.0)
    assert np.all(F == 0) and np.all(f == 0)


def test_attraction_matches_hand_computed_values():
    F = np.array([[0.5, 1, 0, 0], [0.5, 0, 1, 0], [0, 0, 0, 1]])
    np.testing.assert_allclose(attraction(F, 0), [0, 1, 1])
    np.testing.assert_allclose(attraction(F, 2), [1.5, 1.5, 0])


def test_slerp_coefficients():
    a, b = slerp_coefficients(0.0, 0.25)  # orthogonal: sin((1-t) pi/2), sin(t pi/2)
    assert (a, b) == pytest.approx((math.sin(0.75 * math.pi / 2), math.sin(0.25 * math.pi / 2)))
    assert slerp_coefficients(1.0, 0.3) == pytest.approx((0.7, 0.3))  # parallel: linear


def seeded(n=6, archive_size=4, **kw):
    rng = np.random.default_rng(0)
    return M2N2([rng.normal(size=n).astype(np.float32) for _ in range(2)], archive_size=archive_size, **kw)


@pytest.mark.parametrize("split,expect_t", [(0, "1-w everywhere"), (6, "w everywhere"), (3, "both")])
def test_crossover_boundary_cases(split, expect_t):
    x = np.array([1, 0, 0, 1, 0, 0], dtype=np.float32)
    y = np.array([0, 1, 0, 0, 1, 0], dtype=np.float32)  # orthogonal to x
    opt = M2N2([x, y], archive_size=2)
    w = 0.2
    child = opt._slerp(x, y, split, w)
    a_w, b_w = slerp_coefficients(0.0, w)
    a_1w, b_1w = slerp_coefficients(0.0, 1 - w)
    t = np.where(np.arange(6) < split, 1, 0)
    np.testing.assert_allclose(child, np.where(t, a_w * x + b_w * y, a_1w * x + b_1w * y), rtol=1e-6)
    same = opt._slerp(x, x, split, w)  # identical parents: the child is the parent
    np.testing.assert_allclose(same, x, rtol=1e-6)


def test_segment_slerp_uses_one_angle_per_segment():
    x = np.array([1, 0, 1, 0], dtype=np.float32)
    y = np.array([0, 1, 1, 0], dtype=np.float32)  # first half orthogonal, second half parallel
    opt = M2N2([x, y], archive_size=2, slerp="segment")
    child = opt._slerp(x, y, 2, 0.5)
    a, b = slerp_coefficients(0.0, 0.5)
    np.testing.assert_allclose(child, [a, b, 1.0, 0.0], rtol=1e-6)


def test_archive_update_fills_empty_slots_then_drops_the_lowest():
    opt = seeded(archive_size=3)
    rows = [[1, 1, 0, 0], [0, 0, 1, 0]]
    for r in rows:  # the two seeds
        a = opt.ask()
        opt.tell(a.id, 1.0, r)
    assert opt.filled().tolist() == [True, True, False]
    a = opt.ask()
    opt.tell(a.id, 1.0, [0, 0, 0, 1])  # a new niche: fills the empty slot
    assert opt.filled().all()
    a = opt.ask()
    opt.tell(a.id, 1.0, [1, 0, 0, 0])  # dominated by member 0: it is the lowest, the archive is unchanged
    np.testing.assert_array_equal(opt.scores, [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    a = opt.ask()
    opt.tell(a.id, 1.0, [1, 1, 1, 1])  # solves everything: replaces the lowest shared fitness
    assert [1, 1, 1, 1] in opt.scores.tolist()
    member, raw = opt.best()
    assert raw == 1.0 and member is a.x  # reported: highest RAW score


def test_zero_attraction_falls_back_to_fitness():
    x = np.ones(4, dtype=np.float32)
    opt = M2N2([x, 2 * x, 3 * x], archive_size=3, seed=1)
    for _ in range(3):
        a = opt.ask()
        opt.tell(a.id, 1.0, [1, 1])  # identical rows: nobody attracts anybody
    a = opt.ask()
    p1, p2, _, _ = opt.parents[a.id]
    assert p1 != p2 and np.all(np.isfinite(a.x))


def run(opt, rows_of, order=None):
    """Ask until the budget is used; tell each batch of asks in `order` (a permutation function)."""
    while not opt.stop():
        batch = []
        while (a := opt.ask()) is not None:
            batch.append(a)
        for a in (order(batch) if order else batch):
            opt.tell(a.id, 1.0, rows_of(a.x))
    return opt


def rows_of(x):
    return (np.sin(np.arange(12) * x.sum()) > 0).astype(np.float32)


def test_several_in_flight_is_deterministic_whatever_the_tell_order():
    a = run(seeded(max_evals=40, lag=4, mutation_std=0.1), rows_of)
    b = run(seeded(max_evals=40, lag=4, mutation_std=0.1), rows_of, order=lambda batch: batch[::-1])
    np.testing.assert_array_equal(a.scores, b.scores)
    assert all(np.array_equal(m, n) for m, n in zip(a.members, b.members, strict=True))
    c = run(seeded(max_evals=40, lag=1, mutation_std=0.1), rows_of)  # steady state differs from lag 4
    assert not np.array_equal(a.scores, c.scores) or not all(
        np.array_equal(m, n) for m, n in zip(a.members, c.members, strict=True))


def test_resume_by_replay_continues_the_same_run():
    full = run(seeded(max_evals=30, lag=2, mutation_std=0.1, record=True), rows_of)
    half = run(seeded(max_evals=15, lag=2, mutation_std=0.1, record=True), rows_of)
    resumed = seeded(max_evals=30, lag=2, mutation_std=0.1, record=True)
    resumed.replay(half.state()["told"])
    run(resumed, rows_of)
    np.testing.assert_array_equal(full.scores, resumed.scores)
    assert all(np.array_equal(m, n) for m, n in zip(full.members, resumed.members, strict=True))


def test_vector_algebra_combine():
    alg = VectorAlgebra(4)
    x, y = np.arange(4, dtype=np.float32), np.ones(4, dtype=np.float32)
    np.testing.assert_allclose(alg.combine(x, y, 1, (1.0, 0.0), (0.0, 1.0)), [0, 1, 1, 1])


def test_recipe_form_builds_the_same_weights_as_the_full_weight_form(micro_zoo):
    import torch

    from evomerge.merge.piecewise import Pieces, block_gram, build_pieces, make_layout
    from evomerge.merge.sources import open_source
    from evomerge.search.piecewise_space import PiecewiseAlgebra

    names = ("shift", "mirror", "base")
    srcs = [open_source(n, micro_zoo / "models" / n) for n in names]
    layout = make_layout(srcs[0], blocks=97)
    gram = block_gram(srcs, layout)
    vecs = [np.concatenate([s.get(t).reshape(-1).double().numpy() for t in layout.names]) for s in srcs]
    assert vecs[0].shape == (layout.n,)
    np.testing.assert_allclose(gram.sum(0), [[u @ v for v in vecs] for u in vecs], rtol=1e-10)

    def scores(i):  # per-item scores that depend only on the candidate id: both runs see the same archive
        return (np.random.default_rng(i).random(16) > 0.5).astype(np.float32)

    full = M2N2(vecs, archive_size=5, seed=7, max_evals=30, lag=2, algebra=VectorAlgebra(layout.n, layout.edges))
    rec = M2N2([Pieces.seed(k, 3) for k in range(3)], archive_size=5, seed=7, max_evals=30, lag=2,
               algebra=PiecewiseAlgebra(gram))
    checked = 0
    while not full.stop():
        a, b = full.ask(), rec.ask()
        assert (a is None) == (b is None)
        if a is None:
            continue
        assert a.id == b.id and full.parents.get(a.id) == rec.parents.get(a.id)
        for t in layout.names[:: max(1, len(layout.names) // 6)]:
            built = build_pieces(b.x, layout, srcs, t, torch.empty(srcs[0].get(t).shape))
            i = layout.names.index(t)
            want = a.x[layout.offsets[i]:layout.offsets[i] + built.numel()].reshape(built.shape)
            np.testing.assert_allclose(built.numpy(), want, rtol=1e-5, atol=1e-6)
        checked += 1
        full.tell(a.id, 1.0, scores(a.id))
        rec.tell(b.id, 1.0, scores(b.id))
    assert checked == 30 and max(len(m.starts) for m in rec.members if m is not None) > 1


def m2n2_config(zoo, budget, **m2n2):
    from evomerge.run.config import parse_config

    return parse_config({
        "models": {n: str(zoo / "models" / n) for n in ("shift", "mirror", "base")}, "search": "m2n2",
        "m2n2": {"archive_size": 4, "blocks": 64, **m2n2},
        "objective": {"include_path": str(zoo / "tasks"), "tasks": [{"name": "zoo_mixed_search"}], "limit": 30},
        "optimizer": {"seed": 0, "budget": budget}, "workers": {"count": 2, "cpus": 1}}, zoo)


def test_m2n2_search_on_the_zoo_resumes_exactly_and_exports(micro_zoo, ray_local, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.run.controller import Controller
    from evomerge.run.rundir import RunDir
    from evomerge.run.status import export_best

    def evals(run):
        return {r["id"]: r for r in RunDir(run).records() if r["type"] == "eval"}

    st = Controller(m2n2_config(micro_zoo, 12), tmp_path / "full", progress=False).run()
    assert st["evaluations"] == 12 and st["failures"] == 0
    full = evals(tmp_path / "full")
    for i in range(3):  # the seeds come first, each exactly itself
        assert full[i]["recipe"]["pieces"] == [{"start": 0, "coefs": [float(k == i) for k in range(3)]}]
    assert all(len(r["items"]["zoo_mixed_search"]) == 30 for r in full.values())
    Controller(m2n2_config(micro_zoo, 7), tmp_path / "part", progress=False).run()
    Controller(m2n2_config(micro_zoo, 12), tmp_path / "part", resume=True, progress=False).run()
    part = evals(tmp_path / "part")
    assert sorted(part) == sorted(full)
    assert all(part[i]["recipe"] == full[i]["recipe"] and part[i]["fitness"] == full[i]["fitness"] for i in full)
    out = export_best(tmp_path / "full", tmp_path / "best")
    AutoModelForCausalLM.from_pretrained(out)
    assert not (tmp_path / "best.mergekit.yml").exists()


def test_m2n2_archive_seeded_from_an_earlier_run(micro_zoo, ray_local, tmp_path):
    from evomerge.errors import EvomergeError
    from evomerge.run.controller import Controller
    from evomerge.run.rundir import RunDir

    Controller(m2n2_config(micro_zoo, 8), tmp_path / "first", progress=False).run()
    first = sorted((r for r in RunDir(tmp_path / "first").records() if r["type"] == "eval"),
                   key=lambda r: -r["fitness"])
    cfg = m2n2_config(micro_zoo, 7, seed_runs=[str(tmp_path / "first")], seed_top=2)
    Controller(cfg, tmp_path / "second", progress=False).run()
    second = {r["id"]: r for r in RunDir(tmp_path / "second").records() if r["type"] == "eval"}
    distinct = []
    for r in first:  # the two best distinct members of the first run follow the three seed models
        if r["recipe"]["pieces"] not in distinct:
            distinct.append(r["recipe"]["pieces"])
    assert [second[3]["recipe"]["pieces"], second[4]["recipe"]["pieces"]] == distinct[:2]
    bad = m2n2_config(micro_zoo, 7, seed_runs=[str(tmp_path / "nope")])
    with pytest.raises(EvomergeError, match="not a run directory"):
        Controller(bad, tmp_path / "third", progress=False).run()


def test_several_tasks_compete_by_their_objective_weights():
    """Issue 28 #9: a multi-task M2N2 run used to concatenate the tasks' items unweighted, so a task with many
    items drowned one with few whatever the objective's weights. Each task's items now hold the task's weight
    share of the row, and the row's mean is the weighted objective."""
    from types import SimpleNamespace

    from evomerge.run.controller import Controller

    tasks = [SimpleNamespace(name="big", weight=1.0), SimpleNamespace(name="small", weight=3.0)]
    fake = SimpleNamespace(cfg=SimpleNamespace(objective=SimpleNamespace(tasks=tasks)))
    rec = {"items": {"big": [1.0] * 6 + [0.0] * 2, "small": [0.0, 1.0]}}
    row = np.array(Controller._item_row(fake, rec))
    assert len(row) == 10
    big, small = row[:8].sum(), row[8:].sum()
    assert small / (big + small) == pytest.approx((3 * 0.5) / (1 * 0.75 + 3 * 0.5))
    assert row.mean() == pytest.approx((1 * 0.75 + 3 * 0.5) / 4)
    # one task: the row is the per-item scores themselves (single-task runs are unchanged)
    one = SimpleNamespace(cfg=SimpleNamespace(objective=SimpleNamespace(tasks=tasks[:1])))
    assert Controller._item_row(one, {"items": {"big": [1.0, 0.0]}}) == [1.0, 0.0]
