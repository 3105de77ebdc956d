"""`perplexity`: exp(mean next-token NLL) on the evaluation windows (minimised)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pruning.metrics import perplexity
from search.objectives.base import Objective, Score


@dataclass
class Perplexity(Objective):
    windows: torch.Tensor  # (N, T)
    batch_size: int = 8

    name = "perplexity"
    direction = "minimize"

    def __call__(self, model) -> Score:
        return Score(perplexity(model, self.windows, self.batch_size))

    @classmethod
    def study_settings(cls, config) -> None:
        return None  # the windows and batch are the run's own (its identity's seq_len); studies never held any

    @classmethod
    def from_config(cls, config, setup, split: str, checked=None) -> Perplexity:
        return cls(setup.search_windows if split == "search" else setup.held_out_windows, config.batch_size)
