"""One trial: turn the sampled parameters into an architecture on the budget and measure it.

What the trial measures is the run's objective (`search.objectives`: perplexity, KL to the dense model,
task accuracy, lm-eval tasks). The candidate is written to the trial before it is measured and the
outcome after (`search.trials`), so the study alone tells what was measured. A candidate that fails
(out of memory, non-finite metric) is recorded as a failed trial and the search goes on; one that
another trial already holds is pruned unmeasured.
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
from pruning.masking import as_candidate
from search.objectives import Objective
from search.space import SearchSpace
from search.trials import architecture_json, to_loss, write_candidate, write_outcome

WORKER = f"{socket.gethostname()}:{os.getpid()}"
# Two workers that propose the same candidate at once both give way (below). Started together on the same
# seed, they would then propose the same next candidate too, and again, until the study is full of pruned
# trials: each waits this long times (1 + its trial number mod 4) before giving way, so the next proposals
# are made apart and the second sees the first's parameters.
GIVE_WAY_S = 0.25


@dataclass
class TrialObjective:
    """Optuna's objective callable: propose (on the budget), mask, measure `metric`, record."""

    model: PreTrainedModel
    importance: Importance
    space: SearchSpace
    metric: Objective  # bound to the search split
    target: str = "value"  # what the predictor learns: the value or a companion ("margin")

    def __call__(self, trial: optuna.Trial) -> float:
        return self.measure(trial, propose(trial, self.space))

    def measure(self, trial: optuna.Trial, arch: Architecture) -> float:
        start = time.perf_counter()
        name = self.metric.name
        try:
            with as_candidate(self.model, arch, self.importance):
                score = self.metric(self.model)
        except torch.OutOfMemoryError:
            write_outcome(trial, name, time.perf_counter() - start, error="out of memory")
            _free_memory()
            return math.nan  # Optuna records a NaN objective as a failed trial
        elapsed = time.perf_counter() - start
        learned = score.get(self.target)
        if not (math.isfinite(score.value) and math.isfinite(learned)):
            write_outcome(trial, name, elapsed, score.metrics, error=f"non-finite {name} {score.value}")
            return math.nan
        write_outcome(trial, name, elapsed, score.metrics, loss=to_loss(learned, self.metric.target_direction(
            self.target)))
        return score.value


def propose(trial: optuna.Trial, space: SearchSpace) -> Architecture:
    """The trial's architecture on the budget, written to the trial; `TrialPruned` when another trial holds it."""
    params = {name: trial.suggest_int(name, d.low, d.high, step=d.step) for name, d in space.distributions().items()}
    arch = space.from_params(params)
    if not space.fits(arch):  # samplers other than ours propose off-budget points
        arch = space.project(*space.fractions(arch))
    write_candidate(trial, arch, WORKER)
    duplicate, running = _holder(trial, arch.to_json())
    if duplicate is not None:
        if running:  # another worker's, proposed at the same moment: fall out of step with it
            time.sleep(GIVE_WAY_S * (1 + trial.number % 4))
        raise optuna.TrialPruned(f"architecture already held by trial {duplicate}")
    return arch


def _holder(trial: optuna.Trial, arch_json: str) -> tuple[int | None, bool]:
    """(number, whether it is running) of another running or completed trial that holds the same architecture.

    Called after this trial wrote its own architecture, so of two workers racing on one
    architecture the later check always sees the earlier write: at worst both give way,
    never both measure.
    """
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
        if other.number != trial.number and architecture_json(other) == arch_json:
            return other.number, other.state == TrialState.RUNNING
    return None, False


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
