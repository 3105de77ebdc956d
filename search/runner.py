"""One search run as stages that hand each other frozen records (in the shape of torchtune's recipes):

    prepare → tables → start → baselines → search → summarise → export

    run = SearchRun(RunConfig(budget="50%", export=False))
    summary = run.run()                        # or, stage by stage:
    prepared = run.prepare()                   # checks the input, opens the run directory (resuming it)
    summary = run.complete(prepared)           # tables, baselines, trials, summary, export

Every stage resumes what the run directory already holds: importance scores and tables are cached, baselines and
the export's record are stored on the study once, and the trials go on until the study holds the number asked.
The CLIs (`search.run`, `search.export`) only parse, call this and print.
"""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState
from tqdm.auto import tqdm

from predictor.features import FeatureBuilder
from predictor.model import ObjectivePredictor
from pruning.architecture import Architecture
from pruning.data import evenly_spaced
from pruning.files import write_atomic
from pruning.importance import Importance, load_or_compute
from pruning.masking import as_candidate
from pruning.metrics import perplexity
from pruning.sensitivity import Grid, SensitivityTable, measure_sensitivity
from search import objectives, samplers
from search.config import RunConfig
from search.knapsack import knapsack
from search.objectives import objective_class
from search.record import StudyRecord, TablesCost
from search.recovery import recover_and_export
from search.report import RunSummary, own_kendall, publish
from search.sampler import PredictorSampler
from search.samplers import SamplerInputs
from search.setup import Setup, prepare
from search.study import (
    StopAfterMeasurements,
    count_measurements,
    count_trials,
    is_measurement,
    open_storage,
    open_study,
    retry_dead_workers,
)
from search.trial_objective import TrialObjective
from search.trials import best_trial, measured, trial_architecture


@dataclass(frozen=True)
class Prepared:
    """The checked input and what the run directory holds: its study (no sampler yet) and importance scores."""

    setup: Setup
    storage: optuna.storages.BaseStorage
    study: optuna.Study
    importance: Importance


@dataclass(frozen=True)
class Tables:
    """The sensitivity tables of a sampler that reads them (both None otherwise)."""

    dense: SensitivityTable | None = None  # around the dense model
    local: SensitivityTable | None = None  # around the dense table's knapsack, with --local-table


@dataclass(frozen=True)
class Started:
    """Ready to search: `setup.config.trials` is final and the study carries the run's sampler."""

    setup: Setup
    study: optuna.Study
    importance: Importance
    tables: Tables


@dataclass(frozen=True)
class Baselines:
    """Held-out metrics of the base model and the rivals: {model: {"perplexity": ..., objective's metrics}}."""

    metrics: dict[str, dict[str, float]]


@dataclass(frozen=True)
class Searched:
    """The study's best trial (in its direction; ties broken by the loss) and its architecture."""

    best: FrozenTrial
    architecture: Architecture


def identity(setup: Setup) -> dict:
    """What must match for a study to be resumed (or shared by workers)."""
    c = setup.config
    settings = objectives.study_settings(c)
    return {
        "model": c.model,
        "budget": setup.space.budget,
        "spec": setup.space.spec.to_dict(),
        "ffn_step": c.ffn_step,
        "allow_drop": c.allow_drop,
        "objective": c.objective,
        "importance": c.importance,
        "seq_len": c.seq_len,
        "sampler": c.sampler,
        "sensitivity": [c.sensitivity_windows, c.sensitivity_points, c.local_table and c.local_reach]
        if samplers.needs_tables(c.sampler) else None,
        **({} if settings is None else {"objective_settings": settings}),
        **({"model_sha256": setup.source.sha256} if setup.source else {}),
    }


def table_windows(setup: Setup) -> torch.Tensor:
    """(n, T) the sensitivity table's windows: `sensitivity_windows` evenly spread over the search windows."""
    return setup.search_windows[evenly_spaced(len(setup.search_windows), setup.config.sensitivity_windows)]


def tables_cost(study: optuna.Study) -> int:
    """Evaluation windows the run's sensitivity tables cost (0 for a sampler without them)."""
    tables = StudyRecord.from_study(study).tables
    return tables.windows_evaluated if tables else 0


def rival_architectures(setup: Setup, importance: Importance, tables: Tables) -> list[tuple[str, Architecture]]:
    """(name, architecture) of the models the search is compared with: uniform and threshold pruning and,
    with a table, the sensitivity knapsack."""
    space = setup.space
    rivals = [("uniform", space.uniform()), ("threshold", space.threshold(importance))]
    if tables.dense is not None:
        rivals.append(("knapsack", knapsack(space, tables.dense)))
    return rivals


def held_out_metrics(setup: Setup, name: str) -> dict[str, float]:
    """The model's held-out perplexity and, for an objective other than perplexity, its metrics (`name`: the
    model, for the progress bar)."""
    out = {"perplexity": perplexity(setup.model, setup.held_out_windows, setup.config.batch_size,
                                    progress=f"held-out: {name}")}
    if setup.config.objective != "perplexity":
        objective = setup.objective("held_out")
        out.update(objective(setup.model).flat(objective.name))
    return out


class SearchRun:
    """One run of `python -m search.run`, for the CLI, `search.pipeline` and the experiments.

    `windows`: the search's cost in evaluation windows instead of `config.trials`: the trials are what is left of it
    after the sensitivity tables, at `config.search_windows` each, and at least one. `command`: the command line
    recorded in the model card."""

    def __init__(self, config: RunConfig, windows: int | None = None, command: str | None = None) -> None:
        self.config, self.windows, self.command = config, windows, command
        self.started = time.time()
        self.stage_seconds: dict[str, float] = {}  # this invocation's wall time per stage (a resume redoes little)

    def run(self) -> RunSummary:
        return self.complete(self.prepare())

    def complete(self, prepared: Prepared) -> RunSummary:
        with self._stage("tables"):
            tables = self.tables(prepared)
        started = self.start(prepared, tables)
        with self._stage("baselines (held-out)"):
            baselines = self.baselines(started)
        with self._stage("trials"):
            searched = self.search(started)
        summary = self.summarise(started, baselines, searched)
        return self.export(started, summary) if started.setup.config.export else summary

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.stage_seconds[name] = round(self.stage_seconds.get(name, 0.0) + time.perf_counter() - began, 1)

    def prepare(self) -> Prepared:
        """Check the input, then open the run directory, its study and importance scores (resuming each); on a
        fresh directory, an error leaves nothing behind."""
        with self._stage("load and check"):
            setup = prepare(self.config)
        layout, config = setup.layout, setup.config
        fresh = not layout.root.exists()
        layout.root.mkdir(parents=True, exist_ok=True)
        try:
            if setup.source:  # the file's sha256, before anything is measured on it
                write_atomic(layout.model_source, setup.source.to_json())
            storage = open_storage(layout.storage_url(config))
            direction = objective_class(config.objective).direction
            study = open_study(storage, layout.study_name(config), None, identity(setup), direction)
            with self._stage("importance"):
                importance = load_or_compute(setup.model, setup.calibration, config.importance, layout.root,
                                             config.batch_size)
        except BaseException:
            if fresh:
                shutil.rmtree(layout.root, ignore_errors=True)
            raise
        return Prepared(setup, storage, study, importance)

    def tables(self, prepared: Prepared) -> Tables:
        """The per-sublayer table around the dense model and, with `local_table`, a second one around the first's
        knapsack (`local_reach` sizes each side of it), each on `sensitivity_windows` of the search windows (cached
        in the run directory); their cost is stored on the study once."""
        setup, c = prepared.setup, prepared.setup.config
        if not samplers.needs_tables(c.sampler):
            return Tables()
        began = time.perf_counter()
        grid, windows = Grid.spread(setup.space.spec, c.sensitivity_points), table_windows(setup)

        def measure(**around) -> SensitivityTable:
            return measure_sensitivity(setup.model, prepared.importance, windows, grid, ("nll",), c.batch_size,
                                       setup.layout.root, **around)

        dense = measure()
        local = measure(base=knapsack(setup.space, dense), reach=c.local_reach, far=dense) if c.local_table else None
        if StudyRecord.from_study(prepared.study).tables is None:
            measured_tables = [t for t in (dense, local) if t is not None]
            cost = TablesCost(tables=len(measured_tables), measurements=sum(t.measurements() for t in measured_tables),
                              windows=dense.windows,
                              windows_evaluated=sum(t.windows_evaluated() for t in measured_tables),
                              seconds=round(time.perf_counter() - began, 1))
            StudyRecord(tables=cost).to_study(prepared.study)
        return Tables(dense, local)

    def start(self, prepared: Prepared, tables: Tables) -> Started:
        """Fix the number of trials (from `windows`, once the tables' cost is known), attach the sampler and
        record the settings in run.json."""
        setup, study = prepared.setup, prepared.study
        config = setup.config
        if self.windows is not None:
            config = replace(config, trials=max(1, (self.windows - tables_cost(study)) // config.search_windows))
            setup = replace(setup, config=config)
        sampler = samplers.build(SamplerInputs(config, setup.space, prepared.importance, tables.dense, tables.local,
                                               len(study.trials)))
        study = optuna.load_study(study_name=study.study_name, storage=prepared.storage, sampler=sampler)
        write_atomic(setup.layout.config, config.to_json())
        retry_dead_workers(study)
        return Started(setup, study, prepared.importance, tables)

    def baselines(self, started: Started) -> Baselines:
        """Held-out perplexity (and, for another objective, its metrics) of the base model, uniform and threshold
        pruning and, with a table, the sensitivity knapsack; measured once and stored on the study."""
        setup, study = started.setup, started.study
        record = StudyRecord.from_study(study)
        wanted_objective = setup.config.objective != "perplexity"
        if record.baselines and (record.has_objective_baselines or not wanted_objective):
            return Baselines({name: dict(metrics) for name, metrics in record.baselines.items()})
        rivals = rival_architectures(setup, started.importance, started.tables)
        metrics = {"base": held_out_metrics(setup, "base")}
        for name, arch in rivals:
            with as_candidate(setup.model, arch, started.importance):
                metrics[name] = held_out_metrics(setup, name)
        StudyRecord(baselines=metrics).to_study(study)
        return Baselines(metrics)

    def search(self, started: Started) -> Searched:
        """Trials until the study holds `config.trials` measurements, whichever worker makes them."""
        setup, study, c = started.setup, started.study, started.setup.config
        remaining = c.trials - count_measurements(study)
        if remaining > 0:
            objective = TrialObjective(setup.model, started.importance, setup.space, setup.objective("search"),
                                       c.predictor_target)
            bar = tqdm(total=c.trials, initial=c.trials - remaining, desc="trials", unit="trial")

            def progress(study: optuna.Study, trial: FrozenTrial) -> None:
                bar.update(int(is_measurement(trial)))
                if measured(study)[0]:
                    last = f"{trial.value:.3f}" if trial.value else trial.state.name
                    bar.set_postfix(best=f"{best_trial(study).value:.3f}", last=last)

            try:
                study.optimize(objective, callbacks=[progress, StopAfterMeasurements(c.trials)], gc_after_trial=False)
            finally:
                bar.close()
        best = best_trial(study)
        return Searched(best, trial_architecture(best))

    def summarise(self, started: Started, baselines: Baselines, searched: Searched) -> RunSummary:
        """Measure the best candidate on the held-out windows, fit the predictor on every measurement, and write
        the summary (JSON, Markdown, dashboard note and plots) and the best architecture."""
        setup, study, c = started.setup, started.study, started.setup.config
        arch = searched.architecture
        with self._stage("summary (held-out)"), as_candidate(setup.model, arch, started.importance):
            values = {**baselines.metrics, "searched": held_out_metrics(setup, "searched")}
        self._fit_predictor(started)
        complete = count_trials(study, TrialState.COMPLETE)
        failed = sum(t.state == TrialState.FAIL and is_measurement(t) for t in study.trials)
        tau, pairs = own_kendall(study)
        objective = setup.objective()
        summary = RunSummary(
            model=c.model, run_dir=str(setup.layout.root), study_name=study.study_name,
            storage=setup.layout.storage_url(c), budget_params=setup.space.budget,
            base_params=Architecture.full(arch.spec).params(), best_params=arch.params(),
            best_trial=searched.best.number, trials_complete=complete, trials_failed=failed,
            held_out_windows=len(setup.held_out_windows),
            windows_evaluated=tables_cost(study) + (complete + failed) * len(setup.search_windows),
            predictor_kendall_tau=tau, predictor_pairs=pairs, wall_time_s=round(time.time() - self.started, 1),
            objective=objective.name, objective_direction=objective.direction, objective_values=values,
            stage_seconds=dict(self.stage_seconds),
        )
        write_atomic(setup.layout.best_architecture, arch.to_json())
        self._write(started, summary)
        return summary

    def _fit_predictor(self, started: Started) -> None:
        """Fit and save the predictor on every measurement, on the features the search's own predictor learned
        from (its table: the local one when measured); skipped below 5 measurements."""
        study = started.study
        archs, values = measured(study)
        if len(archs) >= 5:
            sampler = study.sampler
            builder = sampler.features if isinstance(sampler, PredictorSampler) else FeatureBuilder(started.importance)
            ObjectivePredictor(seed=started.setup.config.seed).fit(builder.table(archs), values).save(
                started.setup.layout.predictor)

    def export(self, started: Started, summary: RunSummary) -> RunSummary:
        """Slice the best architecture, re-fit and recover it, export it into <run>/model (or model.gguf), and
        add what was measured to the summary."""
        setup = started.setup
        layout = setup.layout
        arch = Architecture.from_json(layout.best_architecture.read_text())
        command = self.command or "python -m search.run " + shlex.join(["--out", str(layout.root)])
        comparisons = {name: values for name, values in summary.objective_values.items() if name != "base"}
        with self._stage("export (re-fit, LoRA, write)"):
            record = recover_and_export(setup, started.importance, arch, layout.export_path(setup.config), command,
                                        force=True, comparisons=comparisons, measured=summary.objective_values)
        StudyRecord(recovery=record.to_dict()).to_study(started.study)
        summary = replace(summary, recovery=record, wall_time_s=round(time.time() - self.started, 1),
                          stage_seconds=dict(self.stage_seconds))
        self._write(started, summary)
        return summary

    @staticmethod
    def _write(started: Started, summary: RunSummary) -> None:
        layout = started.setup.layout
        write_atomic(layout.summary_json, summary.to_json())
        write_atomic(layout.summary_md, summary.to_markdown())
        publish(started.study, summary)
