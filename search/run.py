"""`python -m search.run`: predictor-guided search for a per-layer pruning that fits a parameter budget.

Examples:
    python -m search.run                                   # shipped reference model, 60% budget, 24 trials
    python -m search.run --model meta-llama/Llama-2-7b-hf --budget 5B --calibration wikitext2 --evaluation wikitext2
    python -m search.run --out runs/mine                   # run again with the same --out to resume
    python -m search.run --out runs/shared --storage postgresql://user@host/db   # one worker per GPU/machine
    optuna-dashboard sqlite:///runs/mine/study.db          # watch it
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import time
import warnings
from dataclasses import fields, replace

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

from predictor.features import FeatureBuilder
from predictor.model import ObjectivePredictor
from pruning.architecture import Architecture, format_count
from pruning.data import evenly_spaced
from pruning.files import write_atomic
from pruning.importance import Importance, load_or_compute
from pruning.masking import masked
from pruning.metrics import perplexity
from pruning.sensitivity import Grid, SensitivityTable, measure_sensitivity
from search import objectives, samplers
from search.config import PREDICTOR_TARGETS, RunConfig, RunLayout
from search.export import add_format_arguments, add_reconstruction_arguments, add_recovery_arguments, recover_and_export
from search.knapsack import knapsack
from search.objectives import objective_class
from search.plan import check_fits, make_plan
from search.record import StudyRecord, TablesCost
from search.report import RunSummary, own_kendall, publish
from search.sampler import PredictorSampler
from search.samplers import SamplerInputs
from search.setup import FINAL_EVAL_WINDOWS, USER_ERRORS, Setup, prepare, resolve_device
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


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = argparse.ArgumentParser(
        prog="python -m search.run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default=d.model,
        help="local model directory, hub id, or .gguf file (dequantized; pip install 'prunesearch[gguf]') "
        "(default: the shipped reference model)"
    )
    p.add_argument(
        "--budget",
        default=d.budget,
        help="parameters to keep, embeddings included: 5B, 350M, 2.5e9, or 70%% / 0.7 of the model "
        "(default: %(default)s)",
    )
    p.add_argument("--trials", type=int, default=d.trials, help="candidates to measure (default: %(default)s)")
    p.add_argument(
        "--objective", default=d.objective,
        help="what each trial measures: perplexity, kl (to the dense model), task (accuracy on --task) or "
        "lm-eval:TASK[,TASK] (lm-evaluation-harness, pip install 'prunesearch[eval]') (default: %(default)s)",
    )
    p.add_argument("--task-search-examples", type=int, default=d.task_search_examples,
                   help="--objective task: training examples of --task each trial is measured on (default: "
                   "%(default)s); 20%% of --task is held out for the summary")
    p.add_argument("--predictor-target", default=d.predictor_target, choices=PREDICTOR_TARGETS,
                   help="what the predictor learns: the objective's value, or with --objective task the smooth "
                   "log-likelihood margin of the right option (default: %(default)s)")
    p.add_argument("--eval-limit", type=int, default=d.eval_limit,
                   help="--objective lm-eval:...: documents per task each trial is measured on; the summary "
                   "reports on the rest (default: %(default)s)")
    p.add_argument("--eval-include", default=d.eval_include,
                   help="directory of lm-eval task YAMLs (a local YAML over a local JSONL works offline)")
    p.add_argument(
        "--calibration",
        default=d.calibration,
        help="text for importance scores: file, directory, or wikitext2/c4 online (default: shipped text)",
    )
    p.add_argument(
        "--evaluation", default=d.evaluation, help="held-out text the metric is measured on (default: shipped text)"
    )
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per window (default: %(default)s)")
    p.add_argument("--calibration-windows", type=int, default=d.calibration_windows, help="(default: %(default)s)")
    p.add_argument(
        "--search-windows",
        type=int,
        default=d.search_windows,
        help=f"evaluation windows per trial; the summary uses up to {FINAL_EVAL_WINDOWS} (default: %(default)s)",
    )
    p.add_argument("--importance", default=d.importance, help="wanda, fluctuation or taylor (default: %(default)s)")
    p.add_argument(
        "--sampler",
        default=d.sampler,
        help=f"{', '.join(samplers.REGISTRY)}; predictor and knapsack first measure the sensitivity table and start "
        "from its knapsack, knapsack then ranks by the table alone (default: %(default)s)",
    )
    p.add_argument(
        "--sensitivity-windows",
        type=int,
        default=d.sensitivity_windows,
        help="search windows each sensitivity-table entry is measured on, at most all (default: %(default)s)",
    )
    p.add_argument(
        "--sensitivity-points",
        type=int,
        default=d.sensitivity_points,
        help="kept sizes measured per sublayer for the sensitivity table (default: %(default)s)",
    )
    p.add_argument(
        "--local-table",
        action=argparse.BooleanOptionalAction,
        default=d.local_table,
        help="also measure a table around the first table's knapsack (each sublayer moved while the others stay "
        "pruned) and start the search from its knapsack (default: %(default)s)",
    )
    p.add_argument(
        "--local-reach",
        type=int,
        default=d.local_reach,
        help="grid sizes the local table measures on each side of the knapsack's size, per sublayer; sizes farther "
        "out follow the first table's curve. --sensitivity-points or more measures them all, at about the first "
        "table's cost (default: %(default)s)",
    )
    p.add_argument(
        "--n-startup", type=int, default=d.n_startup, help="trials before the predictor guides (default: %(default)s)"
    )
    p.add_argument(
        "--ffn-step",
        type=int,
        default=d.ffn_step,
        help="FFN channels kept are a multiple of this (default: 8; with --format gguf the type's block, so "
        "every width the search proposes fits it: 32 for q8_0). GGUF block quantization needs it: 32 for "
        "Q8_0, 256 for K-quants (Q4_K...) if you will quantize the export further with llama-quantize",
    )
    p.add_argument(
        "--no-drop", dest="allow_drop", action="store_false", help="never drop a whole attention or MLP sublayer"
    )
    p.add_argument(
        "--storage",
        default=d.storage,
        help="Optuna storage URL (default: sqlite:///<out>/study.db; "
        "journal:<file> or postgresql://... for several workers)",
    )
    p.add_argument("--study-name", default=d.study_name, help="(default: the run directory's name)")
    p.add_argument(
        "--out", default=d.out, help="run directory (default: runs/<model>-<budget>-<time>); reuse it to resume"
    )
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory plan (budget, search space, weights, peak per stage, cost per trial) "
                   "from the model's config alone and exit; a real run prints it first and refuses to start "
                   "when it does not fit the device")
    add_format_arguments(p, d)
    add_reconstruction_arguments(p, d)
    recovery = add_recovery_arguments(p, d)
    recovery.add_argument("--no-export", dest="export", action="store_false",
                          help="stop after the search: no slicing, recovery or export")
    return p


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


def sensitivity_tables(
    study: optuna.Study, setup: Setup, importance: Importance
) -> tuple[SensitivityTable, SensitivityTable | None]:
    """The per-sublayer table around the dense model and, with `local_table`, a second one around the first's
    knapsack (`local_reach` sizes each side of it), each on `sensitivity_windows` of the search windows (cached in
    the run directory). Their cost in windows is stored on the study."""
    c = setup.config
    started = time.perf_counter()
    grid, windows = Grid.spread(setup.space.spec, c.sensitivity_points), table_windows(setup)

    def measure(**around) -> SensitivityTable:
        return measure_sensitivity(setup.model, importance, windows, grid, ("nll",), c.batch_size, setup.layout.root,
                                   **around)

    dense = measure()
    local = measure(base=knapsack(setup.space, dense), reach=c.local_reach, far=dense) if c.local_table else None
    if StudyRecord.from_study(study).tables is None:
        tables = [t for t in (dense, local) if t is not None]
        cost = TablesCost(tables=len(tables), measurements=sum(t.measurements() for t in tables),
                          windows=dense.windows, windows_evaluated=sum(t.windows_evaluated() for t in tables),
                          seconds=round(time.perf_counter() - started, 1))
        StudyRecord(tables=cost).to_study(study)
    return dense, local


def tables_cost(study: optuna.Study) -> int:
    """Evaluation windows the run's sensitivity tables cost (0 for a sampler without them)."""
    tables = StudyRecord.from_study(study).tables
    return tables.windows_evaluated if tables else 0


def rival_architectures(setup: Setup, importance: Importance,
                        sensitivity: SensitivityTable | None) -> list[tuple[str, Architecture]]:
    """(name, architecture) of the models the search is compared with: uniform and threshold pruning and,
    with a table, the sensitivity knapsack."""
    space = setup.space
    rivals = [("uniform", space.uniform()), ("threshold", space.threshold(importance))]
    if sensitivity is not None:
        rivals.append(("knapsack", knapsack(space, sensitivity)))
    return rivals


def baselines(
    study: optuna.Study, setup: Setup, importance: Importance, sensitivity: SensitivityTable | None
) -> dict[str, float]:
    """Held-out perplexity of the base model, uniform and threshold pruning and, with a table, the
    sensitivity knapsack (stored once)."""
    record = StudyRecord.from_study(study)
    if record.perplexities is not None:
        return record.perplexities
    model, windows, batch = setup.model, setup.held_out, setup.config.batch_size
    out = {"base": perplexity(model, windows, batch)}
    for name, arch in rival_architectures(setup, importance, sensitivity):
        with masked(model, arch, importance):
            out[name] = perplexity(model, windows, batch)
    StudyRecord(baselines={name: {"perplexity": value} for name, value in out.items()}).to_study(study)
    return out


def objective_baselines(study: optuna.Study, setup: Setup, importance: Importance,
                        sensitivity: SensitivityTable | None) -> dict[str, dict[str, float]]:
    """Held-out metrics of the base model and the rivals for an objective other than perplexity: the perplexity
    of `baselines` with the objective and its companions (stored once)."""
    record = StudyRecord.from_study(study)
    if record.has_objective_baselines:
        return {name: dict(metrics) for name, metrics in record.baselines.items()}
    base = baselines(study, setup, importance, sensitivity)
    objective = setup.objective("held_out")
    out = {"base": {"perplexity": base["base"], **objective(setup.model).flat(objective.name)}}
    for name, arch in rival_architectures(setup, importance, sensitivity):
        with masked(setup.model, arch, importance):
            out[name] = {"perplexity": base[name], **objective(setup.model).flat(objective.name)}
    StudyRecord(baselines=out).to_study(study)
    return out


def search(study: optuna.Study, setup: Setup, importance: Importance) -> None:
    c = setup.config
    remaining = c.trials - count_measurements(study)
    if remaining <= 0:
        return
    objective = TrialObjective(setup.model, importance, setup.space, setup.objective("search"), c.predictor_target)
    bar = tqdm(total=c.trials, initial=c.trials - remaining, desc="trials", unit="trial")

    def progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        bar.update(int(is_measurement(trial)))
        if measured(study)[0]:
            best = best_trial(study).value
            bar.set_postfix(best=f"{best:.3f}", last=f"{trial.value:.3f}" if trial.value else trial.state.name)

    try:
        study.optimize(  # until the study holds c.trials measurements, whichever worker makes them
            objective,
            callbacks=[progress, StopAfterMeasurements(c.trials)],
            gc_after_trial=False,
        )
    finally:
        bar.close()


def finish(study: optuna.Study, setup: Setup, importance: Importance, sensitivity: SensitivityTable | None,
           started: float) -> RunSummary:
    layout, c = setup.layout, setup.config
    best = best_trial(study)
    arch = trial_architecture(best)
    held_out = {}  # model -> held-out metrics, for an objective other than perplexity
    if c.objective != "perplexity":
        held_out = dict(objective_baselines(study, setup, importance, sensitivity))
        objective = setup.objective("held_out")
    with masked(setup.model, arch, importance):
        best_ppl = perplexity(setup.model, setup.held_out, c.batch_size)
        if held_out:
            held_out["searched"] = {"perplexity": best_ppl, **objective(setup.model).flat(objective.name)}
    base = baselines(study, setup, importance, sensitivity)
    if not held_out:  # perplexity: the baselines are the objective
        held_out = {name: {"perplexity": value} for name, value in (*base.items(), ("searched", best_ppl))}
    archs, values = measured(study)
    if len(archs) >= 5:
        # the features the search's own predictor learned from (its table: the local one when measured)
        builder = study.sampler.features if isinstance(study.sampler, PredictorSampler) else FeatureBuilder(importance)
        features = builder.table(archs)
        ObjectivePredictor(seed=c.seed).fit(features, values).save(layout.predictor)
    table_cost = tables_cost(study)
    complete = count_trials(study, TrialState.COMPLETE)
    failed = sum(t.state == TrialState.FAIL and is_measurement(t) for t in study.trials)
    tau, pairs = own_kendall(study)
    summary = RunSummary(
        model=c.model,
        run_dir=str(layout.root),
        study_name=study.study_name,
        storage=layout.storage_url(c),
        budget_params=setup.space.budget,
        base_params=Architecture.full(arch.spec).params(),
        best_params=arch.params(),
        best_trial=best.number,
        trials_complete=complete,
        trials_failed=failed,
        base_perplexity=base["base"],
        uniform_perplexity=base["uniform"],
        threshold_perplexity=base["threshold"],
        knapsack_perplexity=base.get("knapsack"),
        best_perplexity=best_ppl,
        held_out_windows=len(setup.held_out),
        windows_evaluated=table_cost + (complete + failed) * len(setup.search_windows),
        predictor_kendall_tau=tau,
        predictor_pairs=pairs,
        wall_time_s=round(time.time() - started, 1),
        objective=setup.objective().name,
        objective_direction=setup.objective().direction,
        objective_values=held_out,
    )
    write_atomic(layout.best_architecture, arch.to_json())
    write_summary(study, layout, summary)
    return summary


def write_summary(study: optuna.Study, layout: RunLayout, summary: RunSummary) -> None:
    write_atomic(layout.summary_json, summary.to_json())
    write_atomic(layout.summary_md, summary.to_markdown())
    publish(study, summary)


def export_best(study: optuna.Study, setup: Setup, importance: Importance, summary: RunSummary,
                argv: list[str], started: float) -> RunSummary:
    """Slice the best architecture, recover it and export it into <run>/model (or model.gguf); record the metrics."""
    layout = setup.layout
    arch = Architecture.from_json(layout.best_architecture.read_text())
    command = "python -m search.run " + shlex.join(argv)
    comparisons = {name: values for name, values in summary.objective_values.items() if name != "base"}
    record = recover_and_export(setup, importance, arch, layout.export_path(setup.config), command, force=True,
                                comparisons=comparisons)
    StudyRecord(recovery=record.to_dict()).to_study(study)
    summary = replace(summary, recovery=record, wall_time_s=round(time.time() - started, 1))
    write_summary(study, layout, summary)
    return summary


def resume_command(config: RunConfig, layout: RunLayout, argv: list[str]) -> str:
    args = list(argv)
    if not config.out:
        args += ["--out", str(layout.root)]
    return "python -m search.run " + " ".join(shlex.quote(a) for a in args)


def start(config: RunConfig) -> tuple[Setup, optuna.Study, Importance, SensitivityTable | None]:
    """Check the input, then open the run directory, importance scores, sensitivity table (for the samplers
    that use it) and study, resuming each when it exists."""
    setup = prepare(config)
    layout = setup.layout
    fresh = not layout.root.exists()
    layout.root.mkdir(parents=True, exist_ok=True)
    try:
        if setup.source:  # the file's sha256, before anything is measured on it
            write_atomic(layout.model_source, setup.source.to_json())
        storage = open_storage(layout.storage_url(config))
        direction = objective_class(config.objective).direction
        study = open_study(storage, layout.study_name(config), None, identity(setup), direction)
        importance = load_or_compute(setup.model, setup.calibration, config.importance, layout.root, config.batch_size)
    except BaseException:
        if fresh:  # leave nothing half-written behind
            shutil.rmtree(layout.root, ignore_errors=True)
        raise
    sensitivity = local = None
    if samplers.needs_tables(config.sampler):
        sensitivity, local = sensitivity_tables(study, setup, importance)
    sampler = samplers.build(SamplerInputs(config, setup.space, importance, sensitivity, local, len(study.trials)))
    study = optuna.load_study(study_name=study.study_name, storage=storage, sampler=sampler)
    write_atomic(layout.config, config.to_json())
    return setup, study, importance, sensitivity


def execute(setup: Setup, study: optuna.Study, importance: Importance, sensitivity: SensitivityTable | None,
            argv: list[str], started: float) -> RunSummary:
    """After `start`: measure the baselines, search until the study holds the trials asked for, summarise,
    and (with `export`) slice, recover and export the best; `argv` is recorded in the model card."""
    retry_dead_workers(study)
    baselines(study, setup, importance, sensitivity)
    search(study, setup, importance)
    summary = finish(study, setup, importance, sensitivity, started)
    if setup.config.export:
        summary = export_best(study, setup, importance, summary, argv, started)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.time()
    try:
        config = RunConfig(**{f.name: getattr(args, f.name) for f in fields(RunConfig)})
        config.check_search_target()
        plan = make_plan(config, resolve_device(config.device))
        print(plan.to_text(), file=sys.stdout if args.dry_run else sys.stderr)
        if args.dry_run:
            return 0
        check_fits(plan, config)
        setup, study, importance, sensitivity = start(config)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    layout = setup.layout
    watch = layout.storage_url(config).removeprefix("journal:")
    print(
        f"run directory: {layout.root}\nbudget: {format_count(setup.space.budget)} parameters\n"
        f"watch: optuna-dashboard {watch}",
        file=sys.stderr,
    )
    try:
        summary = execute(setup, study, importance, sensitivity, argv, started)
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: the running trial is marked failed, finished trials are kept.\n"
            f"resume with: {resume_command(config, layout, argv)}",
            file=sys.stderr,
        )
        return 130
    print(summary.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
