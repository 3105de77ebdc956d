"""`python -m search.export`: prune a finished run's best (or chosen) architecture, recover it, export it.

Examples:
    python -m search.export --run runs/mine --out pruned-model
    python -m search.export --run runs/mine --out pruned.gguf --format gguf --gguf-type q8_0
    python -m search.export --run runs/mine --trial 17 --out pruned-17 --recover-steps 400 --distill 0.5
    python -m search.export --run runs/mine --out tuned --task qa.jsonl --task-template "Q: {question}\\nA:" --shots 5

`python -m search.run` calls the same code at the end of a search (into <run>/model).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import optuna

from finetune.card import ModelCard
from finetune.data import (
    TaskFormat,
    encode_tasks,
    pad_id,
    read_task_split,
    task_domain,
    text_domain,
)
from finetune.distill import dense_reference
from finetune.evaluate import EvalData, Evaluation, evaluate, validation_metric
from finetune.gguf import GGUF_TYPES
from finetune.recover import RecoveryConfig, recover
from pruning.architecture import Architecture
from pruning.importance import Importance, load_or_compute
from pruning.masking import masked
from pruning.metrics import perplexity
from pruning.reconstruct import TARGETS, ReconstructionConfig, output_projections, reconstruct, restore
from pruning.slicing import slice_model
from search import formats
from search.config import RunConfig, RunLayout
from search.objectives import task_max_len
from search.objectives.task import search_split
from search.setup import USER_ERRORS, Setup, prepare
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
    notes: tuple[str, ...] = ()  # where the exported model is not simply better than the sliced one
    comparisons: Mapping[str, Mapping[str, float]] = field(default_factory=dict)  # uniform, knapsack, searched...
    unreconstructed: Mapping[str, float] | None = None  # the same slice without reconstruction; None: not run
    reconstruction_seconds: float | None = None
    # the search windows' perplexity (without, with) the re-fit: it is kept only where it lowers it
    reconstruction_search: tuple[float, float] | None = None

    @property
    def reconstruction_kept(self) -> bool:
        return self.reconstruction_search is not None and self.reconstruction_search[1] < self.reconstruction_search[0]

    def __post_init__(self) -> None:
        object.__setattr__(self, "validation", tuple((int(step), float(ppl)) for step, ppl in self.validation))
        object.__setattr__(self, "notes", tuple(self.notes))
        if self.reconstruction_search is not None:
            object.__setattr__(self, "reconstruction_search", tuple(map(float, self.reconstruction_search)))

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


class RunDirectoryError(ValueError):
    """--run, --trial or --out do not name what they must (the CLI prints it and exits 2)."""


def add_recovery_arguments(p: argparse.ArgumentParser, d: RunConfig) -> argparse._ArgumentGroup:
    g = p.add_argument_group("recovery (LoRA after slicing)")
    g.add_argument("--recover-steps", type=int, default=d.recover_steps,
                   help="LoRA steps on the calibration text; 0 exports without tuning. Every tenth of the steps "
                   "the search windows' perplexity (with --task: the task margin on its search examples, "
                   "which tuning leaves out) is measured and the best state is exported, the untuned sliced "
                   "model included, so recovery never makes it worse there; if held-out perplexity still "
                   "rises, the summary says so (default: %(default)s)")
    g.add_argument("--recover-windows", type=int, default=d.recover_windows,
                   help="calibration windows to tune on (default: %(default)s)")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank, help="(default: %(default)s)")
    g.add_argument("--distill", type=float, default=d.distill,
                   help="weight of KL distillation from the dense model, 0..1 (default: %(default)s)")
    g.add_argument("--domain", dest="domains", action="append", default=list(d.domains), metavar="NAME=PATH",
                   help="extra training text; several domains are mixed by dynamic batch loading (repeatable)")
    g.add_argument("--task", default=d.task, help="JSONL of task examples to tune and score on (20%% held out)")
    g.add_argument("--task-template", default=d.task_template, help="str.format prompt over the JSONL fields")
    g.add_argument("--task-answer-prefix", default=d.task_answer_prefix,
                   help="text before every answer and option, e.g. a space or a newline (default: %(default)r)")
    g.add_argument("--shots", type=int, default=d.shots, help="few-shot examples before each task prompt")
    return g


def add_reconstruction_arguments(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group("reconstruction (after slicing, before recovery)")
    g.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=d.reconstruct,
                   help="re-fit each layer's o_proj and down_proj on calibration activations so its output stays "
                   "close to the dense weights' (least squares, layer by layer; no parameter added) "
                   "(default: %(default)s)")
    g.add_argument("--reconstruct-damp", type=float, default=d.reconstruct_damp,
                   help="ridge damping of the re-fit, a share of the mean input energy (default: %(default)s)")
    g.add_argument("--reconstruct-target", choices=TARGETS, default=d.reconstruct_target,
                   help="self: fit the dense weights' output on the pruned model's inputs; dense: fit the dense "
                   "model's output plus the residual stream's drift (runs the dense model alongside; better for "
                   "heavy fixed-ratio pruning of the reference model, over-fits on SmolLM2) (default: %(default)s)")


def reconstruction_settings(config: RunConfig) -> ReconstructionConfig:
    return ReconstructionConfig(damp=config.reconstruct_damp, batch_size=config.batch_size,
                                target=config.reconstruct_target)


def add_format_arguments(p: argparse.ArgumentParser, d: RunConfig) -> None:
    p.add_argument("--format", dest="export_format", choices=list(formats.REGISTRY), default=d.export_format,
                   help="hf: a transformers directory (per-layer remote code when shapes differ); gguf: one file "
                        "for llama.cpp, per-layer shapes as its deci architecture (default: %(default)s)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default=d.gguf_type,
                   help="GGUF weight type; q8_0 needs every FFN width a multiple of 32 (default: %(default)s)")


def _tasks(config: RunConfig, tokenizer, model):
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
    return [text_domain(name, tokenizer, path, config.seq_len, config.recover_windows)
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
                       force: bool, comparisons: Mapping[str, Mapping[str, float]] | None = None) -> RecoveryRecord:
    """Slice the run's model (in place) to `arch`, LoRA-tune it, write the export; return what was measured.

    `comparisons`: other models' held-out metrics for the model card (uniform, knapsack, searched...)."""
    model, tokenizer, config = setup.model, setup.tokenizer, setup.config
    formats.check(arch, model.config, tokenizer, config)
    domains = text_domains(config, tokenizer)
    train_tasks, validation_tasks, held_tasks = _tasks(config, tokenizer, model)
    if train_tasks:
        domains.append(task_domain("task", train_tasks, pad_id(tokenizer)))
    evaluation = EvalData(setup.held_out, held_tasks)  # reported on
    validation = EvalData(setup.search_windows, validation_tasks)  # recovery selects on it
    objective = setup.objective("held_out")  # built while the model is dense

    def measure(m) -> dict[str, float]:
        return {**evaluate(m, evaluation, config.batch_size).to_dict(), **objective(m).flat(objective.name)}

    dense = measure(model)
    reference = dense_teacher(model, config, domains)
    fields_ = {"dense": dense, "comparisons": dict(comparisons or {})}
    if config.reconstruct:
        fields_.update(_reconstruct_if_better(setup, arch, importance, measure))
    slice_model(model, arch, importance)
    fields_["pruned"] = measure(model)
    if config.recover_steps > 0:
        settings = recovery_settings(config)
        model, result = recover(model, domains, settings, evaluation, reference, validation=validation)
        fields_.update(recovered=measure(model), recovery=settings.to_dict(), recovery_seconds=round(result.seconds, 1),
                       selected_step=result.selected_step, validation=result.validation,
                       validated_on=validation_metric(validation),
                       notes=recovery_notes(result.before, result.after, result.selected_step, validation))
    card = ModelCard(budget=config.budget, command=command, metrics_dense=fields_["dense"],
                     metrics_before=fields_["pruned"], metrics_after=fields_.get("recovered") or {},
                     comparisons=fields_["comparisons"])
    export = str(formats.write(model, arch, tokenizer, out, card, config, force))
    return RecoveryRecord(export=export, **fields_)


def _reconstruct_if_better(setup: Setup, arch: Architecture, importance: Importance, measure) -> dict:
    """Re-fit `setup.model` for `arch` in place, and put the weights back unless that lowers the search windows'
    perplexity (selected on validation data, as recovery is; the held-out slice without it is measured for the
    record). Holds a CPU copy of the o_proj / down_proj weights meanwhile."""
    model, batch = setup.model, setup.config.batch_size
    with masked(model, arch, importance):
        fields_ = {"unreconstructed": measure(model)}
        before = perplexity(model, setup.search_windows, batch)
    saved = output_projections(model)
    started = time.perf_counter()
    reconstruct(model, arch, importance, setup.calibration, reconstruction_settings(setup.config))
    fields_["reconstruction_seconds"] = round(time.perf_counter() - started, 1)
    after = perplexity(model, setup.search_windows, batch)  # removed columns are zero: this is the pruned model
    if not after < before:
        restore(saved)
    return {**fields_, "reconstruction_search": (before, after)}


def recovery_notes(before: Evaluation, after: Evaluation, selected_step: int,
                   validation: EvalData) -> tuple[str, ...]:
    """Notes on where the exported model is not simply better than the sliced one."""
    notes = []
    if selected_step == 0:
        what = "the task margin on its search examples" if validation.tasks else "the search windows' perplexity"
        notes.append(f"no recovery step improved {what}: the sliced model is exported untuned")
    if before.task_accuracy is not None and after.task_accuracy < before.task_accuracy:
        notes.append(f"held-out task accuracy is lower after recovery ({before.task_accuracy:.3f} sliced, "
                     f"{after.task_accuracy:.3f} exported)")
    if after.perplexity > before.perplexity:
        notes.append(f"held-out perplexity is worse after recovery ({before.perplexity:.3f} sliced, "
                     f"{after.perplexity:.3f} exported): the held-out text differs from the training and search "
                     "text; try fewer --recover-steps, --distill 0, or --domain with text like the held-out one")
    return tuple(notes)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run directory written by python -m search.run")
    p.add_argument("--trial", type=int, help="export this trial's architecture instead of the best")
    p.add_argument("--out", required=True, help="directory (hf) or .gguf file (gguf) to create for the exported model")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_format_arguments(p, RunConfig())
    add_reconstruction_arguments(p, RunConfig())
    add_recovery_arguments(p, RunConfig())
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    layout = RunLayout(Path(args.run))
    try:
        if not layout.config.exists():
            raise RunDirectoryError(f"{layout.config} not found; --run must be a directory made by search.run")
        saved = json.loads(layout.config.read_text())
        overrides = {k: getattr(args, k) for k in ("recover_steps", "recover_windows", "lora_rank", "distill",
                                                   "domains", "task", "task_template", "task_answer_prefix", "shots",
                                                   "export_format", "gguf_type", "reconstruct",
                                                   "reconstruct_damp")}
        config = replace(RunConfig(**saved), out=str(layout.root), **overrides)
        arch = _architecture(layout, config, args.trial)
        out = Path(args.out)
        if out.exists() and not args.force:
            raise RunDirectoryError(f"{out} already exists; choose another --out or pass --force")
        setup = prepare(config)
        importance = load_or_compute(setup.model, setup.calibration, config.importance, layout.root,
                                     config.batch_size)  # the search's scores: taylor's depend on the batch
        record = recover_and_export(setup, importance, arch, out, "python -m search.export " + shlex.join(argv),
                                    args.force)
    except (*USER_ERRORS, RunDirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(record.to_dict(), indent=2))
    return 0


def _architecture(layout: RunLayout, config: RunConfig, trial: int | None) -> Architecture:
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


if __name__ == "__main__":
    sys.exit(main())
