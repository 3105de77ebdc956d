"""A toy objective and a toy sampler, each added the way a new one is: one class plus one registration line.

Importing this module registers them, so the conformance suites (which import it) test them as they test the
shipped ones; a run can then ask for `--objective top1` or `--sampler per-trial-random`.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from optuna.distributions import IntDistribution
from optuna.samplers import BaseSampler

from search.objectives import Objective, Score, register_objective
from search.samplers import register_sampler


@dataclass
class TopOneAccuracy(Objective):
    """Share of next tokens the model ranks first on the evaluation windows (maximised)."""

    windows: torch.Tensor  # (N, T)
    batch_size: int = 8

    name = "top1"
    direction = "maximize"

    @torch.inference_mode()
    def __call__(self, model) -> Score:
        device = next(model.parameters()).device
        hits = 0
        for start in range(0, len(self.windows), self.batch_size):
            ids = self.windows[start : start + self.batch_size].to(device)  # (B, T)
            hits += int((model(input_ids=ids).logits[:, :-1].argmax(-1) == ids[:, 1:]).sum())
        return Score(hits / (self.windows.shape[0] * (self.windows.shape[1] - 1)))

    @classmethod
    def study_settings(cls, config) -> None:
        return None

    @classmethod
    def from_config(cls, config, setup, split: str, checked=None) -> TopOneAccuracy:
        return cls(setup.search_windows if split == "search" else setup.held_out, config.batch_size)


register_objective(name="top1", objective_cls=TopOneAccuracy)


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
