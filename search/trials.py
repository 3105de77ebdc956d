"""What one trial measured, as a frozen record, and the one place that writes it onto an Optuna trial and reads it back.

A trial's data lives in its attributes, so the study alone (any storage, any worker) tells what was measured:

    user attrs     architecture (JSON), params, param_ratio, worker   written before measuring (`write_candidate`)
                   objective, metrics, loss, wall_time_s, error         written after measuring (`write_outcome`)
                   retry_of                                             on a dead worker's trial queued again
    system attrs   phase, predicted, predicted_spread                   written by the sampler (`write_proposal`)
    value          the objective's value, in the study's direction (perplexity minimised, accuracy maximised)

Samplers and the predictor rank on a positive *loss*, lower is better, whatever the objective's direction:

    loss = value              for a minimised objective (perplexity, KL)
    loss = exp(-value)        for a maximised one (accuracy, log-likelihood margin)

so log(loss) = -accuracy is what the predictor regresses for a maximised objective, and the monotone
constraints (keeping more units never predicts a worse loss) hold unchanged. The loss of the metric the
predictor learns (the objective's value, or a companion such as the margin) is written on the trial.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from pruning.architecture import Architecture

ARCH_ATTR = "architecture"  # user attribute holding the evaluated architecture's JSON
DIRECTIONS = ("minimize", "maximize")


def to_loss(value: float, direction: str) -> float:
    """The positive, lower-is-better number samplers rank on (see the module docstring)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return float(value) if direction == "minimize" else math.exp(-float(value))


@dataclass(frozen=True)
class Measurement:
    """One trial: the candidate, what the objective measured on it, and what the sampler predicted."""

    number: int
    architecture: Architecture | None
    objective: str | None
    value: float | None  # the objective's value; None when the trial failed or was pruned
    metrics: Mapping[str, float] = field(default_factory=dict)  # companions (e.g. margin, acc_norm, per-task)
    loss: float | None = None  # what the predictor learns, as a loss (see `to_loss`)
    params: int | None = None
    param_ratio: float | None = None
    wall_time_s: float | None = None
    worker: str | None = None
    phase: str | None = None  # startup, guided or explore (our samplers)
    prediction: float | None = None  # the predicted loss, written before measuring
    prediction_spread: float | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", dict(self.metrics))

    @property
    def ok(self) -> bool:
        return self.architecture is not None and self.value is not None and math.isfinite(self.value)

    @classmethod
    def from_trial(cls, trial: FrozenTrial) -> Measurement:
        u, s = trial.user_attrs, trial.system_attrs
        arch = Architecture.from_json(u[ARCH_ATTR]) if u.get(ARCH_ATTR) else None
        value = trial.value if trial.state == TrialState.COMPLETE else None
        loss = u.get("loss", value)  # trials written without a loss are of a minimised study (tests, old runs)
        return cls(
            number=trial.number, architecture=arch, objective=u.get("objective"), value=value,
            metrics=u.get("metrics", {}), loss=loss, params=u.get("params"), param_ratio=u.get("param_ratio"),
            wall_time_s=u.get("wall_time_s"), worker=u.get("worker"), phase=s.get("phase"),
            prediction=s.get("predicted"), prediction_spread=s.get("predicted_spread"), error=u.get("error"),
        )


def write_candidate(trial: optuna.Trial, arch: Architecture, worker: str) -> None:
    """Before measuring: what is measured and by whom (duplicate checks and dead-worker retries read these)."""
    trial.set_user_attr(ARCH_ATTR, arch.to_json())
    trial.set_user_attr("params", arch.params())
    trial.set_user_attr("param_ratio", arch.params() / Architecture.full(arch.spec).params())
    trial.set_user_attr("worker", worker)


def write_outcome(trial: optuna.Trial, objective: str, wall_time_s: float, metrics: Mapping[str, float] | None = None,
                  loss: float | None = None, error: str | None = None) -> None:
    """After measuring: the objective's name, companions, the learned loss, the time and any failure."""
    trial.set_user_attr("objective", objective)
    trial.set_user_attr("wall_time_s", round(wall_time_s, 3))
    if metrics:
        trial.set_user_attr("metrics", {k: float(v) for k, v in metrics.items()})
    if loss is not None:
        trial.set_user_attr("loss", float(loss))
    if error is not None:
        trial.set_user_attr("error", error)


def write_proposal(study: optuna.Study, trial: FrozenTrial, phase: str, note: Mapping[str, float]) -> None:
    """The sampler's note on a trial before it is measured: its phase and, when guided, the predicted loss
    (`note`: {"predicted": mean, "predicted_spread": spread}, or empty)."""
    unknown = set(note) - {"predicted", "predicted_spread"}
    if unknown:
        raise ValueError(f"unknown proposal note keys {sorted(unknown)}")
    storage = study._storage
    storage.set_trial_system_attr(trial._trial_id, "phase", phase)
    for key, value in note.items():
        storage.set_trial_system_attr(trial._trial_id, key, float(value))


def trial_architecture(trial: FrozenTrial) -> Architecture | None:
    text = architecture_json(trial)
    return Architecture.from_json(text) if text else None


def architecture_json(trial: FrozenTrial) -> str | None:
    """The candidate's architecture as written (duplicate checks compare these)."""
    return trial.user_attrs.get(ARCH_ATTR)


def trial_worker(trial: FrozenTrial) -> str | None:
    """"host:pid" of the worker measuring (or that measured) the trial."""
    return trial.user_attrs.get("worker")


def trial_error(trial: FrozenTrial) -> str | None:
    """Why the candidate failed on its own (out of memory, non-finite metric); None when it did not."""
    return trial.user_attrs.get("error")


def enqueue_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue `trial`'s parameters again, noting which trial the new one retries."""
    study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})


def completed(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials with a finite value, in trial order."""
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return [t for t in done if t.value is not None and np.isfinite(t.value)]


def measurements(study: optuna.Study) -> list[Measurement]:
    """Every completed trial with a finite value and an architecture, as records, in trial order."""
    return [m for m in map(Measurement.from_trial, completed(study)) if m.ok]


def measured(study: optuna.Study) -> tuple[list[Architecture], np.ndarray]:
    """Architectures and losses (positive, lower is better) of the completed trials."""
    done = [m for m in measurements(study) if m.loss is not None and np.isfinite(m.loss)]
    return [m.architecture for m in done], np.array([m.loss for m in done], dtype=float)


def best_trial(study: optuna.Study) -> FrozenTrial:
    """The completed trial with the best value in the study's direction; among equal values (accuracy on a
    few examples ties often) the one with the lower loss (with `--predictor-target margin`, the larger margin)."""
    done = completed(study)
    if not done:
        raise RuntimeError("no trial completed; see the failed trials' 'error' attribute in the study")
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    return min(done, key=lambda t: (sign * t.value, t.user_attrs.get("loss", 0.0)))  # ties: the better loss
