"""What a trial measures: a small family of objectives (`base.Objective`) chosen by `--objective`.

    perplexity         exp(mean NLL) on the evaluation windows                     minimise   today's default
    kl                 mean KL(dense || candidate), dense top-64 kept (lower bound) minimise   needs the teacher
    task               accuracy on a local multiple-choice JSONL (--task)          maximise   needs labels
    lm-eval:T1[,T2]    lm-evaluation-harness tasks in process (--eval-include)     maximise   needs labels

Adding one is one file (an `Objective` subclass declaring its direction, cost, checks, study settings and
how it is built) plus one `register_objective` line below; `tests/search/test_objective_conformance.py`
then tests it through the registry.

`build(config, setup, split)` binds one to its data: split "search" is what trials are measured on,
"held_out" what summaries and model cards report (windows and task examples no trial saw).
`check(config)` raises what a user must fix (options, lm-eval or its task) before anything is loaded or written.
"""

from __future__ import annotations

from search.objectives.base import Objective, ObjectiveError, Score
from search.objectives.harness import LMEval, Suite
from search.objectives.kl import KL
from search.objectives.perplexity import Perplexity
from search.objectives.registry import REGISTRY, config_problems, kind, objective_class, register_objective
from search.objectives.task import TaskAccuracy, task_max_len

register_objective(name="perplexity", objective_cls=Perplexity)
register_objective(name="kl", objective_cls=KL)
register_objective(name="task", objective_cls=TaskAccuracy)
register_objective(name="lm-eval", objective_cls=LMEval)

SPLITS = ("search", "held_out")

__all__ = ["KL", "LMEval", "Objective", "ObjectiveError", "Perplexity", "REGISTRY", "Score", "Suite", "TaskAccuracy",
           "build", "check", "config_problems", "kind", "objective_class", "register_objective",
           "study_settings", "task_max_len"]


def check(config) -> object | None:
    """Refuse what cannot be measured, reading only the objective's inputs; what it read is kept for `build`."""
    return objective_class(config.objective).check(config)


def study_settings(config) -> dict | None:
    """What, beyond its name, decides the values the objective records (a resume with other values is refused)."""
    return objective_class(config.objective).study_settings(config)


def build(config, setup, split: str, checked: object | None = None) -> Objective:
    """The objective of `config` bound to `split` of `setup`'s data; call before masking (KL reads the dense model)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return objective_class(config.objective).from_config(config, setup, split, checked)
