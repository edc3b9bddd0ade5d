"""Search spaces (vector <-> recipe) and the CMA-ES optimizer behind the ask/tell protocol."""

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.merge.load import parse_recipe
from evomerge.merge.mergekit_out import to_mergekit
from evomerge.merge.plan import resolve_params
from evomerge.search.optimizers import CMAES
from evomerge.search.space import ParameterSpace

MODELS = {"base": "/m/base", "math": "/m/math", "jp": "/m/jp"}


def test_one_group_dare_ties_is_the_papers_six_dimensions():
    models = {**MODELS, "third": "/m/third"}  # the EvoMerge PS set-up: 3 sources, one group
    s = ParameterSpace(method="dare_ties", models=models, base="base", num_layers=32, x0=0.5)
    assert s.dim == 6 and s.x0 == [0.5] * 6
    assert {d.param for d in s.dims} == {"weight", "density"}
    r = s.to_recipe(np.linspace(0.1, 0.6, 6))
    assert r.models["math"].parameters["weight"] == pytest.approx(0.1)
    np.testing.assert_allclose(s.from_recipe(r), np.linspace(0.1, 0.6, 6), atol=1e-6)
    assert ParameterSpace(method="dare_ties", models=models, base="base", num_layers=32,
                          search=["weight", "density", "lambda"]).dim == 7


def test_layer_groups_filters_and_embed_head_round_trip():
    s = ParameterSpace(method="ties", models=MODELS, base="base", num_layers=6, granularity=2,
                       filters=["self_attn"], embed_head=True, search=["weight"], seed=7)
    # cells: embed, head, 3 groups x (self_attn, rest) = 8 per model, 2 models
    assert s.dim == 16
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, s.dim).round(6)
    r = s.to_recipe(x)
    assert r.seed == 7
    np.testing.assert_allclose(s.from_recipe(r), x, atol=1e-6)
    # what mergekit would read for layer 3's attention of 'jp' is that group's value
    gp, tps = resolve_params(parse_recipe(to_mergekit(r)), s.method, "model.layers.3.self_attn.q_proj.weight", 6,
                             ["math", "jp"])
    jp_dim = next(i for i, d in enumerate(s.dims) if d.model == "jp" and d.group == "layers 2-3"
                  and d.filter == "self_attn")
    assert tps[1]["weight"] == pytest.approx(x[jp_dim])
    assert "density" not in r.models["math"].parameters  # not searched, left at its default


def test_fixed_values_and_bounds():
    s = ParameterSpace(method="ties", models=MODELS, base="base", num_layers=4, search=["weight"],
                       fixed={"density": 0.4, "normalize": False}, bounds={"weight": (0.0, 2.0)})
    assert s.upper == [2.0, 2.0]
    r = s.to_recipe([3.0, -1.0])  # clipped into the bounds
    assert r.models["math"].parameters == {"weight": 2.0, "density": 0.4}
    assert r.models["jp"].parameters["weight"] == 0.0 and r.parameters == {"normalize": False}
    r.validate_semantics()


def test_slerp_searches_its_global_t():
    s = ParameterSpace(method="slerp", models={"a": "/a", "b": "/b"}, base="a", num_layers=4, granularity="layer")
    assert s.dim == 4 and all(d.model is None and d.param == "t" for d in s.dims)
    r = s.to_recipe([0.1, 0.2, 0.3, 0.4])
    assert r.parameters["t"] == [0.1, 0.2, 0.3, 0.4]


def test_bad_space_requests():
    with pytest.raises(EvomergeError, match="cannot search 'gamma'"):
        ParameterSpace(method="ties", models=MODELS, base="base", num_layers=4, search=["gamma"])
    with pytest.raises(EvomergeError, match="granularity"):
        ParameterSpace(method="ties", models=MODELS, base="base", num_layers=4, granularity="blocks")


def sphere(x):
    return -float(np.sum((np.asarray(x) - 0.3) ** 2))


def drive(opt, n, fail_every=0):
    trace = []
    while not opt.stop() and len(trace) < n:
        a = opt.ask()
        f = None if fail_every and a.id % fail_every == 0 else sphere(a.x)
        opt.tell(a.id, f)
        trace.append((a.id, a.x.round(8).tolist(), f))
    return trace


def test_cmaes_improves_and_respects_bounds():
    opt = CMAES(4, [0.5] * 4, 1 / 6, [0.0] * 4, [1.0] * 4, seed=1, max_evals=200)
    trace = drive(opt, 1000)
    assert len(trace) == 200 and opt.stop() == {"max_evals": 200}
    xs = np.array([x for _, x, _ in trace])
    assert xs.min() >= 0 and xs.max() <= 1
    assert opt.best()[1] > -1e-3 > sphere([0.5] * 4)


def test_cmaes_is_replayable_and_penalises_failures():
    a = drive(CMAES(3, [0.5] * 3, 0.2, [0.0] * 3, [1.0] * 3, seed=4, max_evals=60), 100, fail_every=5)
    b = drive(CMAES(3, [0.5] * 3, 0.2, [0.0] * 3, [1.0] * 3, seed=4, max_evals=60), 100, fail_every=5)
    assert a == b and any(f is None for _, _, f in a)
    c = drive(CMAES(3, [0.5] * 3, 0.2, [0.0] * 3, [1.0] * 3, seed=5, max_evals=60), 100)
    assert c[0][1] != a[0][1]


def test_cmaes_hands_out_a_generation_then_waits():
    opt = CMAES(2, [0.5, 0.5], 0.1, [0, 0], [1, 1], seed=0, popsize=4)
    asks = [opt.ask() for _ in range(4)]
    assert opt.ask() is None and opt.pending == 4
    for a in reversed(asks):  # any tell order
        opt.tell(a.id, sphere(a.x))
    assert opt.ask().id == 4
    with pytest.raises(ValueError, match="was not handed out"):
        opt.tell(99, 1.0)


def test_cmaes_state_round_trips_through_json_with_candidates_in_flight():
    import json

    a = CMAES(3, [0.5] * 3, 0.2, [0.0] * 3, [1.0] * 3, seed=2, popsize=5, max_evals=40)
    drive(a, 12)  # two full generations and two of the third
    in_flight = [a.ask(), a.ask()]  # handed out, not told
    b = CMAES.from_state(json.loads(json.dumps(a.state())))
    again = [b.ask(), b.ask()]
    assert [x.id for x in again] == [x.id for x in in_flight]
    np.testing.assert_array_equal(again[0].x, in_flight[0].x)
    for opt, asks in ((a, in_flight), (b, again)):
        for x in asks:
            opt.tell(x.id, sphere(x.x))
    assert drive(a, 40) == drive(b, 40)


def test_cmaes_can_measure_its_start_point_first_and_replays_it():
    from evomerge.search.optimizers import CMAES

    opt = CMAES(3, [0.1, 0.2, 0.3], 0.2, [0.0] * 3, [1.0] * 3, popsize=4, max_evals=9, seed=3, eval_x0=True)
    first = opt.ask()
    assert first.id == 0 and list(first.x) == [0.1, 0.2, 0.3] and opt.ask() is None  # x0 alone, then wait
    opt.tell(0, 0.9)
    gen = [opt.ask() for _ in range(4)]
    assert [a.id for a in gen] == [1, 2, 3, 4]
    for a in gen:
        opt.tell(a.id, 0.1)
    assert opt.best()[1] == 0.9  # x0 counts towards the best
    plain = CMAES(3, [0.1, 0.2, 0.3], 0.2, [0.0] * 3, [1.0] * 3, popsize=4, max_evals=9, seed=3)
    assert [list(plain.ask().x) for _ in range(4)] == [list(a.x) for a in gen]  # pycma's samples unchanged
    again = CMAES.from_state(opt.state())
    assert list(again.ask().x) == list(opt.ask().x)


def test_cmaes_restarts_with_a_larger_population_after_converging():
    """IPOP: a flat objective makes pycma stop early; with restarts the budget is still spent, the
    population doubles, and a replay of the tells asks exactly the same candidates."""
    from evomerge.search.optimizers import CMAES

    def run(restarts, budget=120):
        opt = CMAES(3, [0.5] * 3, 0.3, [0.0] * 3, [1.0] * 3, seed=1, popsize=6, max_evals=budget,
                    restarts=restarts)
        asked = []
        while not opt.stop():
            a = opt.ask()
            if a is None:
                break
            asked.append(a.x)
            opt.tell(a.id, 1.0)  # flat: pycma's tolflatfitness fires after a few generations
        return opt, asked

    plain, asked0 = run(0)
    assert len(asked0) < 120 and plain.stop()
    opt, asked = run(9)
    assert len(asked) == 120 and opt.restarted >= 1 and opt.es.popsize == 6 * 2 ** opt.restarted
    np.testing.assert_array_equal(np.array(asked[:len(asked0)]), np.array(asked0))  # same until the restart
    again = CMAES.from_state(opt.state())
    assert again.restarted == opt.restarted and again._next_id == opt._next_id


@pytest.mark.parametrize("diagonal", [False, True])
def test_cmaes_tells_pycma_the_arrays_it_handed_out(diagonal):
    """With the optimum on a bound, many samples fall outside and pycma's bound handling repairs them; told its
    own arrays back, pycma finds their genotypes. Told lists (or anything it does not recognise), it re-repairs
    them and takes another search path. The wrapper must ask exactly what pycma driven directly asks, and a
    replay of its state must go on asking the same."""
    import json

    def f(x):  # optimum at the upper bound of every coordinate
        return -float(np.sum((np.asarray(x) - 1.0) ** 2))

    kw = dict(seed=3, popsize=6, max_evals=200, diagonal=diagonal)
    opt = CMAES(4, [0.5] * 4, 0.4, [0.0] * 4, [1.0] * 4, **kw)
    es = CMAES(4, [0.5] * 4, 0.4, [0.0] * 4, [1.0] * 4, **kw)._strategy(0)  # the same pycma, driven directly
    ours, direct = [], []
    for _ in range(20):
        gen = [opt.ask() for _ in range(6)]
        for a in gen:
            opt.tell(a.id, f(a.x))
        ours += [a.x for a in gen]
        xs = es.ask()
        es.tell(xs, [-f(x) for x in xs])
        direct += [np.array(x) for x in xs]
    assert len(opt.es.sent_solutions) == 0  # pycma recognised (and dropped) every solution it was told
    np.testing.assert_array_equal(np.array(ours), np.array(direct))
    mid = CMAES.from_state(json.loads(json.dumps(opt.state())))
    for _ in range(3):
        gen, again = [opt.ask() for _ in range(6)], [mid.ask() for _ in range(6)]
        np.testing.assert_array_equal(np.array([a.x for a in gen]), np.array([a.x for a in again]))
        for o, asks in ((opt, gen), (mid, again)):
            for a in asks:
                o.tell(a.id, f(a.x))
