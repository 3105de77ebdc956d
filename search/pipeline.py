"""The search as library calls: what `python -m search.run` does, for experiments and notebooks.

    summary = run_search(RunConfig(budget="50%", trials=12, objective="task", task="qa.jsonl", export=False))
    summary = run_search(RunConfig(budget="50%", export=False), windows=1536)  # trials fill 1,536 windows
    summary.objective_values["searched"]            # held-out metrics of the best candidate
    run_measurements(summary)                       # every trial as a `search.trials.Measurement`
    record = recover_architecture(config, arch, out)  # slice, LoRA-recover and export any architecture

The CLI (`search.run.main`) parses argv into the same `RunConfig` (`search.cli_args`), calls the same runner
(`search.runner.SearchRun`), prints and turns errors into exit codes; these functions take arguments, return
records and raise (`search.setup.USER_ERRORS` for bad input).
"""

from __future__ import annotations

from pathlib import Path

import optuna

from pruning.architecture import Architecture
from pruning.importance import load_or_compute
from search.config import RunConfig
from search.recovery import RecoveryRecord, recover_and_export
from search.report import RunSummary
from search.runner import SearchRun
from search.setup import prepare
from search.study import open_storage
from search.trials import Measurement, measurements


def run_search(config: RunConfig, command: str | None = None, windows: int | None = None) -> RunSummary:
    """Search (resuming the run directory `config.out` when it exists), summarise and, with `config.export`,
    slice, recover and export; returns the run's summary. `command` is recorded in the model card.

    `windows`: a cost in evaluation windows instead of `config.trials`: the trials are what is left of it after
    the sensitivity tables (their size is known only once the first table's knapsack is), at
    `config.search_windows` each, and at least one."""
    return SearchRun(config, windows=windows, command=command).run()


def open_run_study(summary: RunSummary) -> optuna.Study:
    """The study of a finished run (read it; the run's own sampler is not attached)."""
    return optuna.load_study(study_name=summary.study_name, storage=open_storage(summary.storage))


def run_measurements(summary: RunSummary) -> list[Measurement]:
    """Every completed trial of a finished run, in trial order."""
    return measurements(open_run_study(summary))


def recover_architecture(config: RunConfig, arch: Architecture, out: Path, command: str = "") -> RecoveryRecord:
    """Slice a fresh copy of `config.model` to `arch`, recover it as `config` asks (LoRA, --task, --domain) and
    export it to `out`; importance scores are read from (or cached in) the run directory `config.out`."""
    setup = prepare(config)
    setup.layout.root.mkdir(parents=True, exist_ok=True)
    importance = load_or_compute(setup.model, setup.calibration, config.importance, setup.layout.root,
                                 config.batch_size)
    return recover_and_export(setup, importance, arch, Path(out), command or "search.pipeline.recover_architecture",
                              force=True)
