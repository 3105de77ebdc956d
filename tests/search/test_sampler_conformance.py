"""What every sampler must do, on a synthetic problem with a known answer (no model needed).

In the spirit of Optuna's `optuna/testing/pytest_samplers.py`. The problem: a 3-layer model
whose "perplexity" is exp of a weighted sum of the squared shares each sublayer gives up, plus a
term coupling adjacent layers (so it is not additive). The sensitivity table is exact for single
sublayers, as a real database would be measured; the knapsack therefore solves the additive
part, and only a search that learns the coupling finds the optimum.
"""

import itertools
import math
from dataclasses import replace

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from pruning.architecture import Architecture, LayerShape, ModelSpec
from pruning.importance import Importance
from pruning.sensitivity import Grid, SensitivityTable
from search.knapsack import knapsack
from search.sampler import ARCH_ATTR, AdditiveSampler, PredictorSampler, trial_architecture
from search.space import SearchSpace
from search.trial_objective import propose

pytestmark = pytest.mark.slow  # about 2 minutes: each sampler runs real Optuna studies with its full machinery

SPEC = ModelSpec("synthetic", "llama", vocab_size=10, hidden_size=16, num_layers=3, num_kv_heads=2, group_size=2,
                 head_dim=4, intermediate_size=32, tie_embeddings=True, qkv_bias=False, o_bias=False, mlp_bias=False)
SPACE = SearchSpace(SPEC, int(Architecture.full(SPEC).params() * 0.6), ffn_step=8, tolerance=0.05)
WEIGHTS = np.array([[3.0, 1.0], [0.5, 2.0], [2.0, 0.7]])  # (L, attention/FFN)


def deficits(arch: Architecture) -> np.ndarray:
    attn, ffn = SPACE.fractions(arch)
    return np.stack([1 - attn, 1 - ffn], axis=1)  # (L, 2) share given up


def true_value(arch: Architecture) -> float:
    d = deficits(arch)
    coupling = 4.0 * (d[:-1].sum(1) * d[1:].sum(1)).sum()  # adjacent layers that both lose a lot compound
    return 10 * math.exp((WEIGHTS * d**2).sum() + coupling)


def exact_table(base: Architecture | None = None) -> SensitivityTable:
    """Single-sublayer rises of log(value) around `base` (default: full), every grid level measured (as
    `measure_sensitivity` would)."""
    grid = Grid.spread(SPEC, points=8)
    around = base or Architecture.full(SPEC)
    before = math.log(true_value(around))

    def rise(i, shape):
        return [math.log(true_value(Architecture(SPEC, around.layers[:i] + (shape,) + around.layers[i + 1:]))) - before]

    attn = [[rise(i, replace(x, kv_heads=kv, heads_per_group=h)) for kv, h in grid.attention]
            for i, x in enumerate(around.layers)]
    ffn = [[rise(i, replace(x, ffn_channels=c)) for c in grid.ffn] for i, x in enumerate(around.layers)]
    return SensitivityTable(SPEC, grid, {"nll": np.array(attn)}, {"nll": np.array(ffn)}, base=base)


def local_table() -> SensitivityTable:
    """The exact table around the dense table's knapsack, as `search.run` measures its second table."""
    return exact_table(knapsack(SPACE, exact_table()))


def importance() -> Importance:
    rng = np.random.default_rng(0)
    heads, channels = tuple(rng.random((2, 2)) for _ in range(3)), tuple(rng.random(32) for _ in range(3))
    return Importance(SPEC, "wanda", heads, channels)


def feasible() -> list[Architecture]:
    """Every architecture of the space within the budget's tolerance."""
    widths = SPACE.ffn_choices()
    out = []
    for combo in itertools.product(range(len(SPACE.levels)), range(len(widths)), repeat=3):
        layers = tuple(LayerShape(*SPACE.levels[combo[2 * i]], int(widths[combo[2 * i + 1]])) for i in range(3))
        arch = Architecture(SPEC, layers)
        if SPACE.fits(arch):
            out.append(arch)
    return out


class ExactPredictorSampler(PredictorSampler):
    """The predictor sampler whose predictor is replaced by the exact objective."""

    def predict(self, archs, values, pool):
        return np.array([true_value(a) for a in pool]), np.zeros(len(pool))


FACTORIES = {
    "predictor": lambda seed: PredictorSampler(SPACE, importance(), exact_table(), n_startup=5, pool_size=200,
                                               n_members=2, seed=seed),
    "predictor-local": lambda seed: PredictorSampler(SPACE, importance(), exact_table(), local_table(), n_startup=5,
                                                     pool_size=200, n_members=2, seed=seed),
    "predictor-no-table": lambda seed: PredictorSampler(SPACE, importance(), n_startup=5, pool_size=200,
                                                        n_members=2, seed=seed),
    "knapsack": lambda seed: AdditiveSampler(SPACE, importance(), exact_table(), n_startup=5, pool_size=200,
                                             seed=seed),
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed, n_startup_trials=5, multivariate=True),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
}
OURS = ("predictor", "predictor-local", "predictor-no-table", "knapsack")


def run_study(sampler, n_trials: int, fail_every: int = 0) -> optuna.Study:
    """A real in-memory study; every `fail_every`-th measurement returns NaN (a failed candidate)."""
    study = optuna.create_study(sampler=sampler)

    def objective(trial):
        arch = propose(trial, SPACE)
        if fail_every and trial.number % fail_every == fail_every - 1:
            return math.nan
        return true_value(arch)

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study.optimize(objective, n_trials=n_trials)
    return study


@pytest.mark.parametrize("name", FACTORIES)
def test_stays_on_budget_and_never_measures_a_duplicate(name):
    study = run_study(FACTORIES[name](0), 14)
    done = study.get_trials(states=(TrialState.COMPLETE,))
    archs = [t.user_attrs[ARCH_ATTR] for t in done]
    assert len(set(archs)) == len(archs)
    assert all(SPACE.fits(trial_architecture(t)) for t in done)
    if name in OURS:  # ours never even propose one: no trial is given up as a duplicate
        assert len(done) == 14


@pytest.mark.parametrize("name", FACTORIES)
def test_failed_candidates_are_recorded_and_the_search_goes_on(name):
    study = run_study(FACTORIES[name](0), 15, fail_every=3)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 5
    assert all(math.isfinite(t.value) for t in study.get_trials(states=(TrialState.COMPLETE,)))
    if name in OURS:
        assert states.count(TrialState.COMPLETE) == 10


@pytest.mark.parametrize("name", FACTORIES)
def test_a_seed_gives_the_same_proposals(name):
    first, second = (run_study(FACTORIES[name](3), 9) for _ in range(2))
    assert [t.params for t in first.trials] == [t.params for t in second.trials]


@pytest.mark.parametrize("name", ("predictor", "predictor-local", "knapsack"))
def test_the_table_samplers_measure_the_knapsack_first(name):
    study = run_study(FACTORIES[name](0), 6)
    rival = knapsack(SPACE, exact_table())
    assert study.trials[0].user_attrs[ARCH_ATTR] == rival.to_json()
    assert study.trials[0].value == true_value(rival)
    # within 6 trials each finds better than its start, and better than uniform pruning (3196 and 10713)
    assert study.best_value < true_value(rival) < true_value(SPACE.uniform())


def test_with_a_local_table_the_second_trial_is_its_knapsack_and_it_improves_on_the_first():
    study = run_study(FACTORIES["predictor-local"](0), 2)
    local = knapsack(SPACE, local_table())
    assert study.trials[1].user_attrs[ARCH_ATTR] == local.to_json()
    # re-linearised around the knapsack, the additive estimate sees the coupling the dense table misses
    assert study.trials[1].value < study.trials[0].value


def test_a_table_around_a_base_reads_zero_at_the_base_and_exact_single_moves_elsewhere():
    base = knapsack(SPACE, exact_table())
    table = exact_table(base)
    assert table.additive([base])[0] == 0.0
    i, here = 1, base.layers[1]
    grown = replace(here, ffn_channels=SPEC.intermediate_size)
    moved = Architecture(SPEC, base.layers[:i] + (grown,) + base.layers[i + 1:])
    assert table.additive([moved])[0] == pytest.approx(math.log(true_value(moved) / true_value(base)))


def test_with_the_exact_objective_as_predictor_the_sampler_finds_the_optimum():
    optimum = min(true_value(a) for a in feasible())
    rival = true_value(knapsack(SPACE, exact_table()))
    assert rival > optimum * 1.01, "the problem must not be solved by the additive knapsack alone"
    for seed in (0, 1):
        sampler = ExactPredictorSampler(SPACE, importance(), exact_table(), n_startup=5, pool_size=300, seed=seed)
        study = run_study(sampler, 20)
        assert study.best_value == pytest.approx(optimum)


def test_the_knapsack_is_optimal_for_its_additive_costs():
    table = exact_table()
    best = min(feasible(), key=lambda a: table.additive([a])[0])
    assert table.additive([knapsack(SPACE, table)]) == pytest.approx(table.additive([best]))
    smaller = replace(SPACE, budget=int(SPACE.budget * 0.8))
    assert smaller.fits(knapsack(smaller, table))
