"""What a trial measures: a small family of objectives (`base.Objective`) chosen by `--objective`.

    perplexity         exp(mean NLL) on the evaluation windows                     minimise   today's default
    kl                 mean KL(dense || candidate), dense top-64 kept (lower bound) minimise   needs the teacher
    task               accuracy on a local multiple-choice JSONL (--task)          maximise   needs labels
    lm-eval:T1[,T2]    lm-evaluation-harness tasks in process (--eval-include)     maximise   needs labels

`build(config, setup, split)` binds one to its data: split "search" is what trials are measured on,
"held_out" what summaries and model cards report (windows and task examples no trial saw).
`check(config)` raises what a user must fix (missing --task, options, lm-eval or its task) before
anything is loaded or written.
"""

from __future__ import annotations

from search.objectives.base import Objective, ObjectiveError, Score
from search.objectives.harness import PREFIX as LM_EVAL_PREFIX
from search.objectives.harness import LMEval, Suite
from search.objectives.kl import KL, Teacher
from search.objectives.perplexity import Perplexity
from search.objectives.task import TaskAccuracy, read_task, search_split

REGISTRY: dict[str, type[Objective]] = {"perplexity": Perplexity, "kl": KL, "task": TaskAccuracy,
                                        LM_EVAL_PREFIX.rstrip(":"): LMEval}
SPLITS = ("search", "held_out")

__all__ = ["KL", "LMEval", "Objective", "ObjectiveError", "Perplexity", "REGISTRY", "Score", "TaskAccuracy",
           "Teacher", "build", "check", "kind", "objective_class", "task_max_len"]


def kind(objective: str) -> str:
    """Registry key of an --objective value ("lm-eval:hellaswag" -> "lm-eval")."""
    key = "lm-eval" if objective.startswith(LM_EVAL_PREFIX) else objective
    if key not in REGISTRY:
        raise ObjectiveError(f"unknown objective {objective!r}; choose perplexity, kl, task or lm-eval:TASK[,TASK]")
    return key


def objective_class(objective: str) -> type[Objective]:
    return REGISTRY[kind(objective)]


def check(config) -> Suite | None:
    """Refuse what cannot be measured, reading only the task files (and lm-eval's task index)."""
    key = kind(config.objective)
    if key == "task":
        if not config.task:
            raise ObjectiveError("--objective task needs --task FILE.jsonl (multiple choice: an \"options\" list and "
                                 "the answer, or its index, in each row) and usually --task-template")
        read_task(config.task, config.task_template, config.task_answer_prefix, config.seed, need_options=True)
    if key == "lm-eval":
        return Suite.load(config.objective, config.eval_include)
    return None


def task_max_len(config, model) -> int:
    """Tokens a task example (shots, prompt and option) may take: the model's positions, at least --seq-len
    (task examples are not the evaluation windows; shots are dropped, earliest first, to fit)."""
    return max(config.seq_len, getattr(model.config, "max_position_embeddings", None) or 0)


def build(config, setup, split: str, suite: Suite | None = None) -> Objective:
    """The objective of `config` bound to `split` of `setup`'s data; call before masking (KL reads the dense model)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    key, batch = kind(config.objective), config.batch_size
    windows = setup.search_windows if split == "search" else setup.held_out
    if key == "perplexity":
        return Perplexity(windows, batch)
    if key == "kl":
        return KL(Teacher.compute(setup.model, windows, batch_size=batch), batch)
    if key == "task":
        train, held = read_task(config.task, config.task_template, config.task_answer_prefix, config.seed, True)
        search, pool = search_split(train, config.task_search_examples)
        examples, pool = (search, pool) if split == "search" else (held, train)
        return TaskAccuracy.encode(setup.tokenizer, examples, pool, task_max_len(config, setup.model), config.shots,
                                   config.seed, batch)
    suite = suite or Suite.load(config.objective, config.eval_include)
    return LMEval.build(suite, setup.model, setup.tokenizer, batch, config.eval_limit, split)
