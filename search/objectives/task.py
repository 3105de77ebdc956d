"""`task`: accuracy on a local multiple-choice JSONL task (maximised), with acc_norm and the margin as companions.

The task is read as `finetune` reads it for recovery (`--task`, `--task-template`, `--task-answer-prefix`,
`--shots`), and split the same way: 20% held out (what summaries report; recovery never trains on it)
and the rest, of which `--task-search-examples` evenly spread are what each trial is measured on.
Their few-shot examples come from the other training examples, never from the example itself.
Options are scored by log-likelihood after the few-shot context, by lm-eval's acc / acc_norm rules
(`finetune.evaluate.task_scores`); the mean log-likelihood margin of the right option is the smooth
companion (`--predictor-target margin` lets the predictor learn from it).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from finetune.data import EncodedTask, TaskExample, TaskFormat, encode_tasks, read_task_split
from finetune.evaluate import task_scores
from search.objectives.base import Objective, ObjectiveError, Score


def read_task(path: str, template: str, answer_prefix: str, seed: int,
              need_options: bool) -> tuple[tuple[TaskExample, ...], tuple[TaskExample, ...]]:
    """(training examples, held-out examples) of a task JSONL; with `need_options`, every example must have
    at least two options (multiple choice), else ObjectiveError naming the first that has not."""
    check = partial(_multiple_choice, path) if need_options else None
    return read_task_split(path, TaskFormat(template, answer_prefix=answer_prefix), seed, check=check)


def _multiple_choice(path: str, examples: tuple[TaskExample, ...]) -> None:
    for i, ex in enumerate(examples):
        if len(ex.options) < 2:
            raise ObjectiveError(f"{path}: example {i + 1} has {len(ex.options)} options; the task objective "
                                 "scores options by log-likelihood, so give every row an \"options\" list of "
                                 "two or more with the answer among them (or use --objective perplexity)")


def task_max_len(config, model) -> int:
    """Tokens a task example (shots, prompt and option) may take: the model's positions, at least --seq-len
    (task examples are not the evaluation windows; shots are dropped, earliest first, to fit)."""
    return max(config.seq_len, getattr(model.config, "max_position_embeddings", None) or 0)


def search_split(train: tuple[TaskExample, ...], n: int) -> tuple[tuple[TaskExample, ...], tuple[TaskExample, ...]]:
    """(`n` search examples evenly spread over `train`, the other training examples: their shot pool)."""
    picked = set(np.linspace(0, len(train) - 1, min(n, len(train))).round().astype(int).tolist())
    search = tuple(ex for i, ex in enumerate(train) if i in picked)
    rest = tuple(ex for i, ex in enumerate(train) if i not in picked)
    return search, rest or train


@dataclass
class TaskAccuracy(Objective):
    tasks: tuple[EncodedTask, ...]
    batch_size: int = 8

    name = "task"
    direction = "maximize"
    needs = ("labels",)
    relative_cost = 9.4  # measured 9.41x, 64 examples (the default) x 4 options with 1 shot vs 32 windows (task_study)
    companions = {"acc_norm": "maximize", "margin": "maximize"}

    @classmethod
    def encode(cls, tokenizer, examples, pool, max_len: int, shots: int, seed: int, batch_size: int):
        return cls(encode_tasks(tokenizer, examples, max_len, shots=shots, seed=seed, pool=pool), batch_size)

    def __call__(self, model) -> Score:
        s = task_scores(model, self.tasks, self.batch_size)
        return Score(s.acc, {"acc_norm": s.acc_norm, "margin": s.margin})

    @classmethod
    def config_problems(cls, config) -> list[str]:
        if config.task:
            return []
        return ["--objective task needs --task FILE.jsonl (multiple choice: each row with an \"options\" list and the "
                "answer or its index); give it, or choose --objective perplexity or kl"]

    @classmethod
    def check(cls, config) -> None:
        read_task(config.task, config.task_template, config.task_answer_prefix, config.seed, need_options=True)

    @classmethod
    def study_settings(cls, config) -> dict:
        return {"task": config.task, "template": config.task_template, "answer_prefix": config.task_answer_prefix,
                "shots": config.shots, "search_examples": config.task_search_examples,
                "predictor_target": config.predictor_target, "seed": config.seed}

    @classmethod
    def from_config(cls, config, setup, split: str, checked=None) -> TaskAccuracy:
        """Search split: `--task-search-examples` of the training examples, shots from the others; held out:
        the held-out examples, shots from all training examples."""
        train, held = read_task(config.task, config.task_template, config.task_answer_prefix, config.seed, True)
        search, pool = search_split(train, config.task_search_examples)
        examples, pool = (search, pool) if split == "search" else (held, train)
        return cls.encode(setup.tokenizer, examples, pool, task_max_len(config, setup.model), config.shots,
                          config.seed, config.batch_size)
