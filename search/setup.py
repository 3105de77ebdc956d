"""Everything a run needs (model, windows, search space), built and checked before anything is written."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from finetune.data import TaskDataError, TaskFormat, read_task_jsonl
from finetune.gguf import GGUFExportError, check_export
from pruning import adapter
from pruning.architecture import Architecture, ArchitectureError
from pruning.data import DataError, read_text, token_windows
from pruning.metrics import default_device
from search.budget import BudgetError, parse_budget
from search.config import ConfigError, RunConfig, RunLayout
from search.space import InfeasibleBudgetError, SearchSpace
from search.study import StorageError, StudyMismatchError, open_storage

FINAL_EVAL_WINDOWS = 128  # evenly spread over the evaluation text: the summary and export metrics
# Errors caused by what the user asked for: the CLIs print them and exit 2.
USER_ERRORS = (
    ConfigError,
    BudgetError,
    adapter.UnsupportedModelError,
    ArchitectureError,
    DataError,
    InfeasibleBudgetError,
    StorageError,
    StudyMismatchError,
    TaskDataError,
    GGUFExportError,
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
    final_windows: torch.Tensor  # (K, T)


def prepare(config: RunConfig) -> Setup:
    model_config = adapter.load_config(config.model)
    spec = adapter.spec_from_config(model_config, config.model)
    budget = parse_budget(config.budget, Architecture.full(spec).params())
    space = SearchSpace(spec, budget, ffn_step=config.ffn_step, allow_drop=config.allow_drop)
    calibration_text, evaluation_text = read_text(config.calibration, "train"), read_text(config.evaluation, "test")
    for _, path in config.domain_sources():
        read_text(path, "train")
    if config.task:
        read_task_jsonl(config.task, TaskFormat(config.task_template))
    if config.storage:
        open_storage(config.storage)
    tokenizer = adapter.load_tokenizer(config.model)
    if config.export and config.export_format == "gguf":  # refuse now, not after the search and recovery
        check_export(Architecture.full(spec), model_config, tokenizer, config.gguf_type)
    calibration = token_windows(
        tokenizer, calibration_text, config.seq_len, config.calibration_windows, "calibration text"
    )
    final = token_windows(tokenizer, evaluation_text, config.seq_len, FINAL_EVAL_WINDOWS, "evaluation text")
    search = final[torch.linspace(0, len(final) - 1, min(config.search_windows, len(final))).round().long()]
    device = default_device() if config.device == "auto" else torch.device(config.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = adapter.load_model(config.model, device, dtype)
    return Setup(config, RunLayout(config.run_dir()), space, model, tokenizer, calibration, search, final)


