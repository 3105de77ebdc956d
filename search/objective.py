"""One trial: turn the sampled parameters into an architecture on the budget and measure it.

The architecture (JSON), its parameter count, the wall time and any failure are
written to the trial, so the study alone tells what was measured. A candidate that
fails (out of memory, non-finite metric) is recorded as a failed trial and the
search goes on; one that another trial already holds is pruned unmeasured.
"""

from __future__ import annotations

import math
import os
import socket
import time
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState
from transformers import PreTrainedModel

from pruning.architecture import Architecture
from pruning.importance import Importance
from pruning.masking import masked
from pruning.metrics import perplexity
from search.sampler import ARCH_ATTR
from search.space import SearchSpace

WORKER = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Objective:
    model: PreTrainedModel
    importance: Importance
    space: SearchSpace
    windows: torch.Tensor  # (N, T) evaluation windows the metric is measured on
    batch_size: int = 8

    def __call__(self, trial: optuna.Trial) -> float:
        return self.measure(trial, propose(trial, self.space))

    def measure(self, trial: optuna.Trial, arch: Architecture) -> float:
        start = time.perf_counter()
        try:
            with masked(self.model, arch, self.importance):
                value = perplexity(self.model, self.windows, self.batch_size)
        except torch.OutOfMemoryError:
            trial.set_user_attr("error", "out of memory")
            _free_memory()
            return math.nan  # Optuna records a NaN objective as a failed trial
        trial.set_user_attr("wall_time_s", round(time.perf_counter() - start, 3))
        if not math.isfinite(value):
            trial.set_user_attr("error", f"non-finite perplexity {value}")
            return math.nan
        return value


def propose(trial: optuna.Trial, space: SearchSpace) -> Architecture:
    """The trial's architecture on the budget, written to the trial; `TrialPruned` when another trial holds it."""
    params = {name: trial.suggest_int(name, d.low, d.high, step=d.step) for name, d in space.distributions().items()}
    arch = space.from_params(params)
    if not space.fits(arch):  # samplers other than ours propose off-budget points
        arch = space.project(*space.fractions(arch))
    trial.set_user_attr(ARCH_ATTR, arch.to_json())
    trial.set_user_attr("params", arch.params())
    trial.set_user_attr("param_ratio", arch.params() / Architecture.full(arch.spec).params())
    trial.set_user_attr("worker", WORKER)
    duplicate = _holder(trial, arch.to_json())
    if duplicate is not None:
        raise optuna.TrialPruned(f"architecture already held by trial {duplicate}")
    return arch


def _holder(trial: optuna.Trial, arch_json: str) -> int | None:
    """Number of another running or completed trial that holds the same architecture.

    Called after this trial wrote its own architecture, so of two workers racing on one
    architecture the later check always sees the earlier write: at worst both give way,
    never both measure.
    """
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
        if other.number != trial.number and other.user_attrs.get(ARCH_ATTR) == arch_json:
            return other.number
    return None


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
