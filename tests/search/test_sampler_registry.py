"""What every registered sampler must do, built through the registry (the toy one of `toy_sampler` included).

The quick companion of `test_sampler_conformance.py` (same synthetic problem, fewer trials): each
sampler is built as a run builds it (`search.samplers.build` from a `RunConfig`), with the sensitivity
table when it declares it needs one.
"""

import math

import pytest
from optuna.trial import TrialState

import tests.search.toy_sampler  # noqa: F401 (registers the toy sampler)
from search import samplers
from search.config import RunConfig
from search.knapsack import knapsack
from search.sampler import trial_architecture
from search.samplers import REGISTRY, SamplerInputs, register_sampler
from search.trials import Measurement
from tests.search.test_sampler_conformance import SPACE, exact_table, importance, run_study

TRIALS = 7  # the fourth fails; 5 startup trials finish, then the sampler chooses one itself (guided: seconds)


def built(name: str, seed: int = 0, resumed_trials: int = 0):
    table = exact_table() if samplers.needs_tables(name) else None
    config = RunConfig(sampler=name, n_startup=5, seed=seed)
    return samplers.build(SamplerInputs(config, SPACE, importance(), table, None, resumed_trials))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_on_budget_no_duplicate_goes_on_after_a_failure_and_a_seed_gives_the_same_proposals(name):
    study, again = (run_study(built(name, seed=3), TRIALS, fail_every=4) for _ in range(2))
    states = [t.state for t in study.trials]
    assert states.count(TrialState.FAIL) == 1 and len(states) == TRIALS
    done = study.get_trials(states=(TrialState.COMPLETE,))
    archs = [Measurement.from_trial(t).architecture for t in done]
    assert len(set(archs)) == len(archs) and all(SPACE.fits(a) for a in archs)
    assert all(math.isfinite(t.value) for t in done)
    assert [t.params for t in study.trials] == [t.params for t in again.trials]


@pytest.mark.parametrize("name", [n for n in REGISTRY if samplers.needs_tables(n)])
def test_a_sampler_that_needs_the_tables_measures_their_knapsack_first(name):
    study = run_study(built(name), 2)
    assert trial_architecture(study.trials[0]) == knapsack(SPACE, exact_table())
    with pytest.raises(ValueError, match="needs the sensitivity table"):
        samplers.build(SamplerInputs(RunConfig(sampler=name), SPACE, importance()))


def test_the_registry_refuses_a_second_sampler_of_one_name_and_config_an_unknown_one():
    with pytest.raises(ValueError, match="'tpe' is already registered"):
        register_sampler(name="tpe", build=REGISTRY["tpe"].build)
    with pytest.raises(ValueError, match="unknown sampler 'annealing'; choose one of predictor, knapsack, tpe"):
        RunConfig(sampler="annealing")
    assert [n for n in REGISTRY if samplers.needs_tables(n)][:2] == ["predictor", "knapsack"]
