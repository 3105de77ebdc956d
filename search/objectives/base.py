"""What every objective is: a name, a direction, what it needs, a relative cost, and a call on the (masked) model.

An objective also declares, on its class, what the run asks of the user for it: `config_problems` (checks of
the run's settings), `check` (of its files, before anything is loaded), `study_settings` (what beyond its name
decides its values: part of the study's identity) and `from_config` (how it is built for a split). Registered
by `search.objectives.register_objective`, it is then a valid `--objective`.

An objective is bound to its data when built (the search split that trials are measured on, or the
held-out split results are reported on) and then called once per candidate:

    score = objective(model)        # model: the live model, masked to the candidate (or sliced)
    score.value                     # the number the study optimises, in `direction`
    score.metrics                   # companions: smooth stand-ins (margin), other rules (acc_norm), per task

Anything the objective needs from the dense model (the KL teacher) is computed when it is built, before
any candidate is masked, so dense and pruned models are never held together.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch


class ObjectiveError(ValueError):
    """An objective that cannot be built from what the user gave; the message says what to change."""


@dataclass(frozen=True)
class Score:
    """An objective's value on one model, with its companion metrics."""

    value: float
    metrics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", {k: float(v) for k, v in self.metrics.items()})

    def get(self, name: str) -> float:
        """The value itself ("value") or one companion by name."""
        return self.value if name == "value" else self.metrics[name]

    def flat(self, objective: str) -> dict[str, float]:
        """{objective: value, "objective/companion": ...}: how summaries and model cards list it."""
        return {objective: float(self.value), **{f"{objective}/{k}": v for k, v in self.metrics.items()}}


class Objective(abc.ABC):
    """Base of every objective. Subclasses set the class attributes and implement `__call__`."""

    name: ClassVar[str]
    direction: ClassVar[str] = "minimize"  # or "maximize"
    needs: ClassVar[tuple[str, ...]] = ()  # "teacher" (dense model outputs), "labels" (task answers)
    relative_cost: ClassVar[float] = 1.0  # rough time per trial over perplexity's on the same windows
    companions: ClassVar[Mapping[str, str]] = {}  # companion metric name -> its direction
    usage: ClassVar[str | None] = None  # "NAME:ARGUMENT" form of an objective that takes one (lm-eval:TASK[,TASK])

    @abc.abstractmethod
    def __call__(self, model: torch.nn.Module) -> Score: ...

    @classmethod
    def config_problems(cls, config) -> list[str]:
        """What the user must change in the run's settings (`RunConfig`) for this objective; read from them alone."""
        return []

    @classmethod
    def check(cls, config) -> object | None:
        """Refuse what cannot be measured, reading only the objective's own inputs (task files, lm-eval's index)
        before any model is loaded; what it returns is handed to `from_config` (None: nothing to keep)."""
        return None

    @classmethod
    @abc.abstractmethod
    def study_settings(cls, config) -> dict | None:
        """The settings, beyond its name, that decide the values it records: the study's identity holds them, so a
        resume with other values is refused. None: none (the identity then has no objective_settings)."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, config, setup, split: str, checked: object | None) -> Objective:
        """Bound to `split` ("search" or "held_out") of `setup`'s data; `checked` is what `check` returned."""

    @classmethod
    def target_direction(cls, target: str) -> str:
        """Direction of what the predictor learns: the value ("value") or a companion."""
        if target == "value":
            return cls.direction
        if target not in cls.companions:
            raise ObjectiveError(f"objective {cls.__name__} records no {target!r}; "
                                 f"give --predictor-target value{''.join(', ' + c for c in cls.companions)}")
        return cls.companions[target]

    @property
    def label(self) -> str:
        """Name as summaries and the model card show it."""
        return self.name
