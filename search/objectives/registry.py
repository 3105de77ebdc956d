"""The objectives a run can be asked for, by name: one registration line each (`search.objectives`)."""

from __future__ import annotations

import inspect

from search.objectives.base import Objective, ObjectiveError

REGISTRY: dict[str, type[Objective]] = {}


def register_objective(*, name: str, objective_cls: type[Objective]) -> None:
    """Make `objective_cls` the `--objective NAME` (or `NAME:ARGUMENT`, when it declares a `usage`)."""
    if name in REGISTRY:
        raise ValueError(f"objective {name!r} is already registered ({REGISTRY[name].__name__})")
    if ":" in name:
        raise ValueError(f"objective name {name!r} may not hold ':' (it separates an objective's argument)")
    if inspect.isabstract(objective_cls):
        missing = ", ".join(sorted(objective_cls.__abstractmethods__))
        raise TypeError(f"{objective_cls.__name__} does not declare {missing}; every objective must")
    REGISTRY[name] = objective_cls


def choices() -> str:
    """The --objective values, as an error message lists them: "perplexity, kl, task or lm-eval:TASK[,TASK]"."""
    names = [cls.usage or name for name, cls in REGISTRY.items()]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def kind(objective: str) -> str:
    """Registry key of an --objective value ("lm-eval:hellaswag" -> "lm-eval")."""
    key, colon, _ = objective.partition(":")
    cls = REGISTRY.get(key)
    if cls is None or (colon and cls.usage is None):
        raise ObjectiveError(f"unknown objective {objective!r}; choose {choices()}")
    return key


def objective_class(objective: str) -> type[Objective]:
    return REGISTRY[kind(objective)]


def config_problems(config) -> list[str]:
    """What the user must change in `config` for its --objective: the objective's own checks, and a
    --predictor-target that only another objective records."""
    key, colon, _ = config.objective.partition(":")
    cls = REGISTRY.get(key)
    if cls is None or bool(colon) != (cls.usage is not None):
        return [f"unknown objective {config.objective!r}; choose {choices()}"]
    problems = cls.config_problems(config)
    target = config.predictor_target
    owners = [name for name, other in REGISTRY.items() if target in other.companions]
    if target != "value" and target not in cls.companions and owners:
        problems.append(f"--predictor-target {target} is the {' or '.join(owners)} objective's companion; "
                        f"give --objective {owners[0]} or drop it")
    return problems
