"""Everything a run needs (model, windows, search space), built and checked before anything is written."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch

from finetune.data import TaskDataError, TaskFormat, read_task_split
from finetune.gguf import GGUFExportError
from pruning import adapter
from pruning.architecture import Architecture, ArchitectureError
from pruning.data import DataError, evenly_spaced, read_text, token_windows
from pruning.metrics import default_device
from search import formats, objectives
from search.budget import BudgetError, parse_budget
from search.config import FINAL_EVAL_WINDOWS, ConfigError, ModelSource, RunConfig, RunLayout
from search.space import InfeasibleBudgetError, SearchSpace, SpaceError
from search.study import StorageError, StudyMismatchError, open_storage

# Errors caused by what the user asked for: the CLIs print them and exit 2.
USER_ERRORS = (
    ConfigError,
    BudgetError,
    adapter.UnsupportedModelError,
    ArchitectureError,
    DataError,
    InfeasibleBudgetError,
    SpaceError,
    StorageError,
    StudyMismatchError,
    TaskDataError,
    GGUFExportError,
    objectives.ObjectiveError,
)


@dataclass
class Setup:
    """What `prepare` checked and loaded."""

    config: RunConfig
    layout: RunLayout
    space: SearchSpace
    model: torch.nn.Module
    tokenizer: object
    calibration: torch.Tensor  # (N, T)
    search_windows: torch.Tensor  # (M, T)
    final_windows: torch.Tensor  # (K, T) evenly spread over the evaluation text; the search windows are M of them
    held_out_windows: torch.Tensor  # (K - M, T) the final windows no trial is measured on: what results are reported on
    checked: object | None = None  # what the objective's `check` read (lm-eval's tasks), reused when it is built
    source: ModelSource | None = None  # the GGUF file the model was read from (None: a directory or hub id)
    _objectives: dict = field(default_factory=dict, repr=False)

    def objective(self, split: str = "search") -> objectives.Objective:
        """The run's objective bound to the search or held-out split, built once; build "held_out" while the
        model is dense (before slicing: the KL teacher reads it)."""
        if split not in self._objectives:
            self._objectives[split] = objectives.build(self.config, self, split, self.checked)
        return self._objectives[split]


def resolve_device(name: str) -> torch.device:
    """`auto`, `cpu` or `cuda[:N]` as a device this machine has; ConfigError otherwise."""
    if name == "auto":
        return default_device()
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"--device {name!r} is not a device name; give auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this torch build sees no CUDA GPU; give --device cpu (or auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                          f"cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def run_dtype(device: torch.device) -> torch.dtype:
    """Weights in bf16 on CUDA, float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def check_seq_len(config: RunConfig, model_config) -> None:
    """Refuse windows longer than the positions the model was trained on: quality is meaningless there,
    and attention's cost grows with the square of the length."""
    limit = getattr(model_config, "max_position_embeddings", None)
    if limit and config.seq_len > limit:
        raise ConfigError(f"--seq-len {config.seq_len} is beyond the {limit} positions {config.model} was trained "
                          f"on (max_position_embeddings); give --seq-len {limit} or less")


def model_source(config: RunConfig, layout: RunLayout) -> ModelSource | None:
    """The record of a GGUF --model (None for a directory or hub id); ConfigError where the run directory was
    made from another file (resuming or exporting it would mix two models)."""
    if not adapter.is_gguf(config.model):
        return None
    source = ModelSource.of(config.model)
    if layout.model_source.exists():
        recorded = ModelSource.from_json(layout.model_source.read_text())
        if recorded.sha256 != source.sha256:
            raise ConfigError(f"{config.model} (sha256 {source.sha256}) is not the file {layout.root} was made from "
                              f"({recorded.path}, sha256 {recorded.sha256}); give that file as --model, or start a "
                              "new run with another --out")
    return source


def prepare(config: RunConfig) -> Setup:
    model_config = adapter.load_config(config.model)
    check_seq_len(config, model_config)
    device = resolve_device(config.device)
    spec = adapter.spec_from_config(model_config, config.model)
    budget = parse_budget(config.budget, Architecture.full(spec).params())
    space = SearchSpace(spec, budget, ffn_step=config.ffn_step, allow_drop=config.allow_drop)
    calibration_text, evaluation_text = read_text(config.calibration, "train"), read_text(config.evaluation, "test")
    for _, path in config.domain_sources():
        read_text(path, "train")
    checked = objectives.check(config)  # first: a --task the objective cannot score is named so, not as too small
    if config.task:  # read and split as the objective, recovery and the summaries will
        read_task_split(config.task, TaskFormat(config.task_template, answer_prefix=config.task_answer_prefix),
                        config.seed)
    if config.storage:
        open_storage(config.storage)
    tokenizer = adapter.load_tokenizer(config.model)
    if config.export:  # refuse now, not after the search and recovery
        formats.check(Architecture.full(spec), model_config, tokenizer, config)
    calibration = token_windows(
        tokenizer, calibration_text, config.seq_len, config.calibration_windows, "calibration text"
    )
    final = token_windows(tokenizer, evaluation_text, config.seq_len, FINAL_EVAL_WINDOWS, "evaluation text")
    picked = evenly_spaced(len(final), config.search_windows)
    held_out = final[~torch.isin(torch.arange(len(final)), picked)]
    if len(held_out) == 0:
        raise DataError(
            f"the evaluation text gives {len(final)} windows and the search measures all of them, so none is left "
            "to report on; give more evaluation text or fewer --search-windows"
        )
    layout = RunLayout(config.run_dir())
    source = model_source(config, layout)
    model = adapter.load_model(config.model, device, run_dtype(device))
    setup = Setup(config, layout, space, model, tokenizer, calibration, final[picked], final, held_out, checked,
                  source)
    setup.objective("search")  # refuses now what the objective cannot measure (e.g. too few lm-eval documents)
    return setup


def prepare_or_say_why(config: RunConfig) -> Setup | None:
    """`prepare(config)` for an experiment's command line: None after printing the user's error (it exits 2)."""
    try:
        return prepare(config)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return None
