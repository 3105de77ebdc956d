"""`lm-eval:TASK[,TASK]`: lm-evaluation-harness tasks run in process on the masked in-memory model (maximised).

The live model is wrapped once as `HFLM(pretrained=model, tokenizer=...)`; every trial calls
`simple_evaluate` on it, so masks apply without copying weights. The value is the mean over the tasks
of `acc`; each task's acc and acc_norm are companions. Trials are measured on a task's first
`--eval-limit` documents and summaries report on the documents after them (lm-eval's `samples`).

Offline, a task can be a local YAML over a local JSONL, found through `--eval-include DIR`
(`TaskManager(include_path=DIR)`), e.g.

    task: my_task
    dataset_path: json
    dataset_kwargs: {data_files: {test: /data/my_task.jsonl}}
    test_split: test
    output_type: multiple_choice
    doc_to_text: "{{question}}"
    doc_to_choice: "{{choices}}"
    doc_to_target: label
    metric_list: [{metric: acc}, {metric: acc_norm}]

Needs `pip install 'prunesearch[eval]'` (lm-eval >= 0.4.13).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from search.objectives.base import Objective, ObjectiveError, Score

PREFIX = "lm-eval:"


def task_names(objective: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in objective.removeprefix(PREFIX).split(",") if n.strip())
    if not names:
        raise ObjectiveError(f"--objective {objective!r} names no task; give lm-eval:TASK or lm-eval:TASK1,TASK2")
    return names


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError as err:
        raise ObjectiveError("--objective lm-eval:... needs lm-evaluation-harness: pip install 'prunesearch[eval]' "
                             "(lm-eval>=0.4.13), or choose --objective perplexity, kl or task") from err
    return lm_eval, HFLM, TaskManager, get_task_dict


@dataclass(frozen=True)
class Suite:
    """The tasks, loaded and checked once: the task manager and each task's number of documents."""

    names: tuple[str, ...]
    manager: object
    sizes: dict[str, int]

    @classmethod
    def load(cls, objective: str, include: str | None) -> Suite:
        _, _, TaskManager, get_task_dict = _lm_eval()
        names = task_names(objective)
        manager = TaskManager(include_path=include, verbosity="ERROR")
        missing = [n for n in names if n not in manager.all_tasks]
        if missing:
            where = f" or under --eval-include {include}" if include else "; give --eval-include DIR with its YAML"
            raise ObjectiveError(f"lm-eval task {', '.join(missing)} not found among lm-eval's tasks{where}")
        try:
            tasks = get_task_dict(list(names), manager)
        except Exception as err:  # datasets' errors offline: unreachable hub, missing local file
            raise ObjectiveError(f"lm-eval could not load task {', '.join(names)} ({str(err).splitlines()[0]}); "
                                 "offline, define it by a local YAML over a local JSONL (--eval-include DIR)") from err
        return cls(names, manager, {n: len(tasks[n].eval_docs) for n in names})


@dataclass
class LMEval(Objective):
    suite: Suite
    model_wrapper: object  # lm_eval HFLM around the live model
    samples: dict[str, list[int]]  # task -> document indices measured

    direction = "maximize"
    needs = ("labels",)
    relative_cost = 4.3  # measured 4.31x, 64 zero-shot next-line documents vs 32 windows (experiments/task_study.py)
    usage = PREFIX + "TASK[,TASK]"

    @property
    def name(self) -> str:  # noqa: D401 (the objective as the user wrote it)
        return PREFIX + ",".join(self.suite.names)

    @classmethod
    def build(cls, suite: Suite, model, tokenizer, batch_size: int, limit: int, split: str) -> LMEval:
        _, HFLM, _, _ = _lm_eval()
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
        samples = {}
        for name, n in suite.sizes.items():
            if n <= limit:
                raise ObjectiveError(f"lm-eval task {name} has {n} documents, so --eval-limit {limit} leaves none "
                                     f"to report on; give --eval-limit {max(1, n // 2)} or less")
            samples[name] = list(range(limit)) if split == "search" else list(range(limit, n))
        return cls(suite, lm, samples)

    @classmethod
    def check(cls, config) -> Suite:
        return Suite.load(config.objective, config.eval_include)

    @classmethod
    def study_settings(cls, config) -> dict:
        return {"limit": config.eval_limit, "include": config.eval_include}

    @classmethod
    def from_config(cls, config, setup, split: str, checked: Suite | None = None) -> LMEval:
        suite = checked or cls.check(config)
        return cls.build(suite, setup.model, setup.tokenizer, config.batch_size, config.eval_limit, split)

    def __call__(self, model) -> Score:
        lm_eval, *_ = _lm_eval()
        out = lm_eval.simple_evaluate(model=self.model_wrapper, tasks=list(self.suite.names),
                                      task_manager=self.suite.manager, samples=self.samples, log_samples=False,
                                      verbosity="ERROR")["results"]
        metrics = {}
        for name in self.suite.names:
            for metric in ("acc", "acc_norm"):
                if f"{metric},none" in out[name]:
                    metrics[f"{name}/{metric}"] = out[name][f"{metric},none"]
        accs = [metrics[f"{n}/acc"] for n in self.suite.names if f"{n}/acc" in metrics]
        if not accs:
            raise ObjectiveError(f"lm-eval tasks {', '.join(self.suite.names)} report no acc metric; "
                                 "give multiple-choice tasks with metric_list: [{metric: acc}]")
        return Score(sum(accs) / len(accs), metrics)
