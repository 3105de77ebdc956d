"""A toy sampler, added the way a new one is: one class plus one registration line.

Importing this module registers it, so the sampler suite (which imports it) tests it as it tests the
shipped ones; a run can then ask for `--sampler per-trial-random`.
"""

from __future__ import annotations

import zlib

import numpy as np
from optuna.distributions import IntDistribution
from optuna.samplers import BaseSampler

from search.samplers import register_sampler


class PerTrialRandomSampler(BaseSampler):
    """Each parameter drawn uniformly from its grid by a generator seeded with (seed, trial number, parameter):
    the same trial gets the same proposal whatever ran before it."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def infer_relative_search_space(self, study, trial) -> dict:
        return {}

    def sample_relative(self, study, trial, search_space) -> dict:
        return {}

    def sample_independent(self, study, trial, param_name: str, param_distribution: IntDistribution) -> int:
        rng = np.random.default_rng([self.seed, trial.number, zlib.crc32(param_name.encode())])
        d = param_distribution
        return d.low + d.step * int(rng.integers(0, (d.high - d.low) // d.step + 1))


register_sampler(name="per-trial-random", build=lambda inputs: PerTrialRandomSampler(inputs.config.seed))
