"""The samplers a run can be asked for (`--sampler`), by name: how each is built and whether it needs the tables.

    predictor   predictor-guided, started from the sensitivity knapsack (`search.sampler.PredictorSampler`)
    knapsack    the same start, then ranks by the sensitivity table alone (`AdditiveSampler`)
    tpe, gp, cmaes, random    Optuna's own

Adding one is one file with a `build(inputs) -> optuna.samplers.BaseSampler` plus one `register_sampler`
line; `tests/search/test_sampler_registry.py` then tests it through the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import optuna

from pruning.importance import Importance
from pruning.sensitivity import SensitivityTable
from search.sampler import AdditiveSampler, PredictorSampler
from search.space import SearchSpace


@dataclass(frozen=True)
class SamplerInputs:
    """What a sampler is built from."""

    config: object  # the run's RunConfig (n_startup, seed)
    space: SearchSpace
    importance: Importance
    sensitivity: SensitivityTable | None = None  # the dense table: given to the samplers that need tables
    local: SensitivityTable | None = None  # the table around its knapsack (--local-table)
    resumed_trials: int = 0  # trials the study holds already (a resumed run)

    @property
    def resumed_seed(self) -> int:
        """Optuna's samplers draw from their seed alone: offset it on resume so they do not replay the proposals
        the study already holds (ours draw per trial number)."""
        return self.config.seed + self.resumed_trials


@dataclass(frozen=True)
class SamplerEntry:
    name: str
    build: Callable[[SamplerInputs], optuna.samplers.BaseSampler]
    needs_tables: bool = False  # measure the sensitivity tables before the first trial and hand them to `build`
    config_problems: Callable[[object], list[str]] | None = None  # what the user must change in RunConfig for it


REGISTRY: dict[str, SamplerEntry] = {}


def register_sampler(*, name: str, build: Callable[[SamplerInputs], optuna.samplers.BaseSampler],
                     needs_tables: bool = False, config_problems: Callable[[object], list[str]] | None = None) -> None:
    """Make `build` the `--sampler NAME`."""
    if name in REGISTRY:
        raise ValueError(f"sampler {name!r} is already registered")
    REGISTRY[name] = SamplerEntry(name, build, needs_tables, config_problems)


def config_problems(config) -> list[str]:
    """What the user must change in `config` for its --sampler."""
    entry = REGISTRY.get(config.sampler)
    if entry is None:
        return [f"unknown sampler {config.sampler!r}; choose one of {', '.join(REGISTRY)}"]
    return entry.config_problems(config) if entry.config_problems else []


def needs_tables(name: str) -> bool:
    """Whether the sampler starts from the sensitivity tables (so the run measures them first)."""
    return REGISTRY[name].needs_tables


def build(inputs: SamplerInputs) -> optuna.samplers.BaseSampler:
    entry = REGISTRY[inputs.config.sampler]
    if entry.needs_tables and inputs.sensitivity is None:
        raise ValueError(f"sampler {entry.name!r} needs the sensitivity table; measure it first")
    return entry.build(inputs)


def _predictor(i: SamplerInputs) -> PredictorSampler:
    return PredictorSampler(i.space, i.importance, i.sensitivity, i.local, n_startup=i.config.n_startup,
                            seed=i.config.seed)


def _knapsack(i: SamplerInputs) -> AdditiveSampler:
    return AdditiveSampler(i.space, i.importance, i.sensitivity, i.local, n_startup=i.config.n_startup,
                           seed=i.config.seed)


def _enough_startup(config) -> list[str]:
    return [] if config.n_startup >= 5 else ["--n-startup must be at least 5"]  # the predictor's first fit


register_sampler(name="predictor", build=_predictor, needs_tables=True, config_problems=_enough_startup)
register_sampler(name="knapsack", build=_knapsack, needs_tables=True)
register_sampler(name="tpe", build=lambda i: optuna.samplers.TPESampler(
    seed=i.resumed_seed, n_startup_trials=i.config.n_startup, multivariate=True))
register_sampler(name="gp", build=lambda i: optuna.samplers.GPSampler(
    seed=i.resumed_seed, n_startup_trials=i.config.n_startup, deterministic_objective=True))
register_sampler(name="cmaes", build=lambda i: optuna.samplers.CmaEsSampler(
    seed=i.resumed_seed, n_startup_trials=i.config.n_startup))
register_sampler(name="random", build=lambda i: optuna.samplers.RandomSampler(seed=i.resumed_seed))
