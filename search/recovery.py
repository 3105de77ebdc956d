"""Slice an architecture, re-fit and LoRA-recover it, export it, and record what each step measured: the library
under `python -m search.export` and the end of `python -m search.run`."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import optuna

from finetune.card import ModelCard
from finetune.data import TaskFormat, encode_tasks, pad_id, read_task_split, task_domain, text_domain
from finetune.distill import dense_reference
from finetune.evaluate import EvalData, evaluate, validation_metric
from finetune.recover import RecoveryConfig, recover
from pruning.architecture import Architecture
from pruning.importance import Importance, load_or_compute
from pruning.masking import as_candidate
from pruning.metrics import perplexity
from pruning.reconstruct import (
    DAMP_CHOICES,
    DEFAULT_DAMP,
    ReconstructionConfig,
    output_projections,
    reconstruct,
    restore,
)
from pruning.slicing import slice_model
from search import formats
from search.config import RunConfig, RunLayout
from search.objectives import task_max_len
from search.objectives.task import search_split
from search.setup import Setup, prepare
from search.trials import trial_architecture

TEACHER_TOP_K = 32


@dataclass(frozen=True)
class RecoveryRecord:
    """What slicing, recovery and export did, measured on the held-out data (windows and task examples).

    Each metrics dict holds perplexity, task_accuracy with --task, and the run's objective with its companions
    (`search.objectives.Score.flat`: {"kl": ...}, {"task": ..., "task/margin": ...}).
    """

    dense: Mapping[str, float]
    pruned: Mapping[str, float]  # sliced (and reconstructed, unless --no-reconstruct), before recovery
    export: str
    recovered: Mapping[str, float] | None = None  # None with --recover-steps 0
    recovery: Mapping | None = None  # the RecoveryConfig used
    recovery_seconds: float | None = None
    selected_step: int | None = None  # the step kept, best on the validation data (0: the untuned slice)
    validation: tuple[tuple[int, float], ...] = ()  # (step, validation loss) at every check
    # what the validation loss is: the search windows' "perplexity", or with --task "-task margin" on the task's
    # search examples (which tuning then leaves out)
    validated_on: str = "perplexity"
    notes: tuple[str, ...] = ()  # where the export is not simply the sliced model made better (padding, say)
    comparisons: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # uniform, knapsack, searched...
    unreconstructed: Mapping[str, float] | None = None  # the same slice without reconstruction; None: not run
    reconstruction_seconds: float | None = None
    # the search windows' perplexity (without, with) the best re-fit: it is kept only where it lowers it
    reconstruction_search: tuple[float, float] | None = None
    reconstruction_damps: tuple[tuple[float, float], ...] = ()  # (damp, search-window perplexity) of each re-fit

    @property
    def reconstruction_kept(self) -> bool:
        return self.reconstruction_search is not None and self.reconstruction_search[1] < self.reconstruction_search[0]

    @property
    def reconstruction_damp(self) -> float | None:
        """The damping of the re-fit kept (the best on the search windows); None where none was kept."""
        if not (self.reconstruction_kept and self.reconstruction_damps):
            return None
        return min(self.reconstruction_damps, key=lambda t: t[1])[0]

    def __post_init__(self) -> None:
        object.__setattr__(self, "validation", tuple((int(step), float(ppl)) for step, ppl in self.validation))
        object.__setattr__(self, "notes", tuple(self.notes))
        if self.reconstruction_search is not None:
            object.__setattr__(self, "reconstruction_search", tuple(map(float, self.reconstruction_search)))
        object.__setattr__(self, "reconstruction_damps", tuple((float(d), float(p)) for d, p in
                                                               self.reconstruction_damps))

    @property
    def final(self) -> Mapping[str, float]:
        """Metrics of the exported model."""
        return self.recovered if self.recovered is not None else self.pruned

    @property
    def steps(self) -> int:
        return self.recovery["steps"] if self.recovery else 0

    def to_dict(self) -> dict:
        """Plain JSON types (lists for tuples), as stored on the study and in summary.json."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping) -> RecoveryRecord:
        return cls(**data)


@dataclass(frozen=True)
class Refit:
    """What `refit_selected` measured: the search windows' perplexity of the slice without a re-fit and with one
    at each damping tried, and the seconds all of it took."""

    without: float
    tried: tuple[tuple[float, float], ...]  # (damp, search-window perplexity)
    seconds: float

    @property
    def best(self) -> tuple[float, float]:
        """(damp, search-window perplexity) of the re-fit with the lowest perplexity."""
        return min(self.tried, key=lambda t: t[1])

    @property
    def damp(self) -> float | None:
        """The damping kept: the best one, where its perplexity is below `without`; else None."""
        damp, ppl = self.best
        return damp if ppl < self.without else None


class RunDirectoryError(ValueError):
    """--run, --trial or --out do not name what they must (the CLI prints it and exits 2)."""


def reconstruction_settings(config: RunConfig) -> ReconstructionConfig:
    """The re-fit a run asks for; without --reconstruct-damp, at DEFAULT_DAMP (`refit_selected` tries them all)."""
    return ReconstructionConfig(damp=config.reconstruct_damp or DEFAULT_DAMP, batch_size=config.batch_size,
                                target=config.reconstruct_target)


def task_examples(config: RunConfig, tokenizer, model):
    """Encoded task examples (tuned on, validated on, held out), or ((), (), ()). Recovery validates on the
    search examples (those the task objective measures trials on) and tunes on the other training examples."""
    if not config.task:
        return (), (), ()
    fmt = TaskFormat(config.task_template, answer_prefix=config.task_answer_prefix)
    train, held = read_task_split(config.task, fmt, config.seed)
    search, tune = search_split(train, config.task_search_examples)
    encode = dict(max_len=task_max_len(config, model), shots=config.shots, seed=config.seed)
    scored = all(len(ex.options) >= 2 for ex in search)  # a generation task (no options) validates on perplexity
    return (encode_tasks(tokenizer, tune, **encode),
            encode_tasks(tokenizer, search, pool=tune, **encode) if scored else (),
            encode_tasks(tokenizer, held, pool=train, **encode))


def text_domains(config: RunConfig, tokenizer) -> list:
    """The language-modelling domains recovery trains on: the calibration text and every --domain."""
    return [text_domain(name, tokenizer, path, config.seq_len, config.tuning_windows())
            for name, path in config.domain_sources()]


def recovery_settings(config: RunConfig) -> RecoveryConfig:
    """The LoRA recovery a run's settings ask for (also what experiments.compare gives every method)."""
    return RecoveryConfig(steps=config.recover_steps, batch_size=config.batch_size, rank=config.lora_rank,
                          alpha=2.0 * config.lora_rank, distill_weight=config.distill, seed=config.seed)


def dense_teacher(model, config: RunConfig, domains: list):
    """The dense model's `DenseReference` for tuning (call before slicing); None where tuning would not read it:
    distillation needs its top-k targets, dynamic batch loading over several domains its losses."""
    if config.recover_steps == 0 or not (config.distill > 0 or len(domains) > 1):
        return None
    top_k = TEACHER_TOP_K if config.distill > 0 else 0
    return dense_reference(model, domains, top_k=top_k, batch_size=config.batch_size)


def recover_and_export(setup: Setup, importance: Importance, arch: Architecture, out: Path, command: str,
                       force: bool, comparisons: Mapping[str, Mapping[str, float]] | None = None,
                       measured: Mapping[str, Mapping[str, float]] | None = None) -> RecoveryRecord:
    """Slice the run's model (in place) to `arch`, LoRA-tune it, write the export; return what was measured.

    `comparisons`: other models' held-out metrics for the model card (uniform, knapsack, searched...).
    `measured`: the run's own held-out metrics of the dense model ("base") and of `arch` unfitted ("searched"),
    used instead of measuring them again where they are what `measure` gives (the perplexity objective)."""
    model, tokenizer, config = setup.model, setup.tokenizer, setup.config
    formats.check(arch, model.config, tokenizer, config)
    domains = text_domains(config, tokenizer)
    train_tasks, validation_tasks, held_tasks = task_examples(config, tokenizer, model)
    if train_tasks:
        domains.append(task_domain("task", train_tasks, pad_id(tokenizer)))
    evaluation = EvalData(setup.held_out_windows, held_tasks)  # reported on
    validation = EvalData(setup.search_windows, validation_tasks)  # recovery selects on it
    objective = setup.objective("held_out")  # built while the model is dense

    plain = objective.name == "perplexity" and not evaluation.tasks  # the objective is evaluate's perplexity
    known = dict(measured or {}) if plain else {}

    def measure(m, label: str) -> dict[str, float]:
        values = evaluate(m, evaluation, config.batch_size, progress=f"held-out: {label}").to_dict()
        return values if plain else {**values, **objective(m).flat(objective.name)}

    dense = dict(known["base"]) if "base" in known else measure(model, "dense")
    reference = dense_teacher(model, config, domains)
    fields_ = {"dense": dense, "comparisons": dict(comparisons or {})}
    if config.reconstruct:
        fields_.update(_reconstruct_if_better(setup, arch, importance, measure, known.get("searched")))
    slice_model(model, arch, importance)
    fields_["pruned"] = measure(model, "sliced")
    if config.recover_steps > 0:
        settings = recovery_settings(config)
        model, result = recover(model, domains, settings, None, reference, validation=validation)  # measured here
        recovered = measure(model, "recovered")
        fields_.update(recovered=recovered, recovery=settings.to_dict(), recovery_seconds=round(result.seconds, 1),
                       selected_step=result.selected_step, validation=result.validation,
                       validated_on=validation_metric(validation),
                       notes=recovery_notes(fields_["pruned"], recovered, result.selected_step, validation))
    card = ModelCard(budget=config.budget, command=command, metrics_dense=fields_["dense"],
                     metrics_before=fields_["pruned"], metrics_after=fields_.get("recovered") or {},
                     comparisons=fields_["comparisons"])
    export = str(formats.write(model, arch, tokenizer, out, card, config, force))
    fields_["notes"] = (*fields_.get("notes", ()), *formats.notes(arch, tokenizer, config))
    return RecoveryRecord(export=export, **fields_)


def refit_selected(model, arch: Architecture, importance: Importance, setup: Setup) -> Refit:
    """Re-fit `model` (full-size, dense weights) for `arch` in place at each damping the run allows (its
    --reconstruct-damp, or every one of DAMP_CHOICES) and keep the one with the lowest search-window perplexity;
    where none lowers the unfitted slice's, the dense weights are put back. Selected on validation data, as
    recovery is. Holds a CPU copy of the o_proj / down_proj weights meanwhile."""
    config, windows = setup.config, setup.search_windows
    with as_candidate(model, arch, importance):
        without = perplexity(model, windows, config.batch_size)
    saved = output_projections(model)
    began, tried = time.perf_counter(), []
    for i, damp in enumerate(DAMP_CHOICES if config.reconstruct_damp is None else (config.reconstruct_damp,)):
        if i:
            restore(saved)  # the dense weights again before the next re-fit
        reconstruct(model, arch, importance, setup.calibration, replace(reconstruction_settings(config), damp=damp))
        with as_candidate(model, arch, importance):  # removed columns are zero: the slice computes the same
            tried.append((damp, perplexity(model, windows, config.batch_size)))
    refit = Refit(without, tuple(tried), 0.0)
    if refit.damp is None:
        restore(saved)
    elif refit.damp != tried[-1][0]:  # the best was not the last one tried: fit it again
        restore(saved)
        reconstruct(model, arch, importance, setup.calibration,
                    replace(reconstruction_settings(config), damp=refit.damp))
    return replace(refit, seconds=round(time.perf_counter() - began, 1))


def _reconstruct_if_better(setup: Setup, arch: Architecture, importance: Importance, measure,
                           unreconstructed: Mapping[str, float] | None) -> dict:
    """`refit_selected` on the run's model, with the held-out slice without it measured for the record (unless
    given)."""
    if unreconstructed is None:
        with as_candidate(setup.model, arch, importance):
            unreconstructed = measure(setup.model, "unfitted")
    refit = refit_selected(setup.model, arch, importance, setup)
    return {"unreconstructed": dict(unreconstructed), "reconstruction_seconds": refit.seconds,
            "reconstruction_search": (refit.without, refit.best[1]), "reconstruction_damps": refit.tried}


def recovery_notes(before: Mapping[str, float], after: Mapping[str, float], selected_step: int,
                   validation: EvalData) -> tuple[str, ...]:
    """Notes on where the exported model is not simply better than the sliced one (held-out metrics of each)."""
    notes = []
    if selected_step == 0:
        what = "the task margin on its search examples" if validation.tasks else "the search windows' perplexity"
        notes.append(f"no recovery step improved {what}: the sliced model is exported untuned")
    if before.get("task_accuracy") is not None and after["task_accuracy"] < before["task_accuracy"]:
        notes.append(f"held-out task accuracy is lower after recovery ({before['task_accuracy']:.3f} sliced, "
                     f"{after['task_accuracy']:.3f} exported)")
    if after["perplexity"] > before["perplexity"]:
        notes.append(f"held-out perplexity is worse after recovery ({before['perplexity']:.3f} sliced, "
                     f"{after['perplexity']:.3f} exported): the held-out text differs from the training and search "
                     "text; try fewer --recover-steps, --distill 0, or --domain with text like the held-out one")
    return tuple(notes)


def export_from_run(run_dir: Path, out: Path, overrides: Mapping, trial: int | None = None, force: bool = False,
                    command: str = "python -m search.export") -> RecoveryRecord:
    """Export a finished run's best architecture (or `trial`'s) to `out`, with the run's settings and `overrides`
    (RunConfig fields: format, reconstruction, recovery); RunDirectoryError where the run or trial is not there."""
    layout = RunLayout(Path(run_dir))
    if not layout.config.exists():
        raise RunDirectoryError(f"{layout.config} not found; --run must be a directory made by search.run")
    config = replace(RunConfig(**json.loads(layout.config.read_text())), out=str(layout.root), **overrides)
    arch = run_architecture(layout, config, trial)
    if Path(out).exists() and not force:
        raise RunDirectoryError(f"{out} already exists; choose another --out or pass --force")
    setup = prepare(config)
    importance = load_or_compute(setup.model, setup.calibration, config.importance, layout.root,
                                 config.batch_size)  # the search's scores: taylor's depend on the batch
    return recover_and_export(setup, importance, arch, Path(out), command, force,
                              measured=summary_measurements(layout, trial))


def summary_measurements(layout: RunLayout, trial: int | None) -> dict[str, dict[str, float]]:
    """The finished run's held-out metrics of the dense model and, when its best architecture is exported (no
    `trial`), of that architecture unfitted: what the export would otherwise measure again."""
    if not layout.summary_json.exists():
        return {}
    values = json.loads(layout.summary_json.read_text()).get("objective_values", {})
    names = ("base", "searched") if trial is None else ("base",)
    return {name: values[name] for name in names if name in values}


def run_architecture(layout: RunLayout, config: RunConfig, trial: int | None) -> Architecture:
    """The run's best architecture, or with `trial` that trial's."""
    if trial is None:
        if not layout.best_architecture.exists():
            raise RunDirectoryError(f"{layout.best_architecture} not found; finish the search or pass --trial")
        return Architecture.from_json(layout.best_architecture.read_text())
    study = optuna.load_study(study_name=layout.study_name(config), storage=layout.storage_url(config))
    trials = [t for t in study.trials if t.number == trial]
    arch = trial_architecture(trials[0]) if trials else None
    if arch is None:
        raise RunDirectoryError(f"trial {trial} has no measured architecture in {layout.root}; "
                                "pick one from the dashboard")
    return arch
