"""How long a run will take, stage by stage, estimated before it starts from the model's config alone.

One random decoder layer and the model's head are built at the config's shapes and timed on one batch of the
run's windows (random weights and tokens: the time does not depend on their values). Per window of T tokens:

    w_l   one decoder layer                                         (measured)
    w_h   the embedding, final norm, LM head and loss               (measured)
    w     = L·w_l + w_h   the model
    w_b   = w_h + L·w_l·P_b'/P'   the sliced model (P' the decoder's parameters, P_b' the budget's share of them);
                                  a candidate costs w_b too, measured as a sliced view (`pruning.masking.as_candidate`;
                                  masked, where the copy does not fit, it costs w)

    stage                  seconds (C calibration, S sensitivity, M search, E held-out windows; R = --recover-steps)
    importance             C·w (taylor: 3·C·w, its backward too)
    tables                 S·Σ over each option of layer i of ((L-i)·w_l + w_h), the base pass and the stream L·w_l;
                           the local table at its bound (`plan.table_windows`), its options spread over the layers
    baselines (held-out)   E·w + rivals·E·w_b
    trials                 trials·M·w_b·(the objective's relative cost) + PREDICTOR_S per trial
    summary (held-out)     E·w_b
    export                 distillation targets TEACHER_PASSES·N·w (N = min(--recover-windows, R·B))
                           + re-fit: M·w_b (the unfitted slice) + per damping (REFIT_PASSES·K·L·w_l + M·w_b),
                             K its calibration windows
                           + 2·E·w_b (sliced, recovered) + validations·M·w_b + R·B·TRAIN_PASSES·w_b
                           (the dense model and the unfitted slice on the held-out windows are the summary's; an
                           objective other than perplexity measures them again: + E·w, + E·w more when re-fitting)

The constants were measured on SmolLM2-135M on 2 CPU cores (experiments/results/timing-smollm2.md).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from finetune.recover import RecoveryConfig
from pruning import adapter
from pruning.architecture import Architecture
from pruning.layerwise import layer_inputs, run_layer
from pruning.metrics import window_losses
from pruning.reconstruct import DAMP_CHOICES, ReconstructionConfig
from pruning.sensitivity import Grid
from search import samplers
from search.budget import parse_budget
from search.config import FINAL_EVAL_WINDOWS, RunConfig
from search.objectives import objective_class
from search.plan import table_windows
from search.setup import run_dtype

# measured on SmolLM2-135M's default run (2 CPU cores, experiments/results/timing-smollm2.md): a LoRA step of 8
# windows 3.5 forward passes of the sliced model per window (forward and backward, the head's loss in closed form,
# no dropout); the dense model's top-k targets 1.25 of its forward passes per window (one head pass serves the loss
# and the top-k of a 49,152-token vocabulary); a trial 3.5 s more than its windows (the knapsack solves, fitting
# the predictor and ranking its candidates, the study's database)
TRAIN_PASSES = 3.5
TEACHER_PASSES = 1.25
REFIT_PASSES = 2.0  # a re-fit runs each layer on the pruned and the dense stream
PREDICTOR_S = 3.5


@dataclass(frozen=True)
class WindowCost:
    """Seconds per window of the run's --seq-len tokens."""

    layer: float  # one decoder layer
    head: float  # embedding, final norm, LM head and the loss

    def model(self, layers: int) -> float:
        return layers * self.layer + self.head


def measure_window_cost(model_config: PretrainedConfig, seq_len: int, batch_size: int, device: torch.device,
                        dtype: torch.dtype) -> WindowCost:
    """Time one random layer and the head of `model_config`'s shapes on one batch of random windows (the fastest
    of a few timings, after a warm-up)."""
    config = copy.deepcopy(model_config)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    windows = torch.randint(config.vocab_size, (batch_size, seq_len))
    layer = adapter.decoder_layers(model)[0]

    def seconds(fn, repeats: int) -> float:
        best = float("inf")
        for _ in range(repeats):  # the first is the warm-up
            began = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - began)
        return best

    with torch.inference_mode():
        whole = seconds(lambda: window_losses(model, windows, batch_size), 3)
        batch = layer_inputs(model, windows, batch_size)[0]
        # a layer is short (0.1 s on SmolLM2's shapes): best of more (a run once timed it at 1.4x its idle time)
        one_layer = seconds(lambda: run_layer(layer, batch.hidden, batch.kwargs), 6)
    return WindowCost(layer=one_layer / batch_size, head=max(whole - one_layer, 0.0) / batch_size)


@dataclass(frozen=True)
class TimePlan:
    """Estimated seconds per stage, named as the run's summary names them."""

    stages: dict[str, float]
    cost: WindowCost

    @property
    def total(self) -> float:
        return sum(self.stages.values())

    def to_text(self) -> str:
        rows = "\n".join(f"  {name:<34} {_duration(s):>10}" for name, s in self.stages.items())
        return (f"time plan (one window: {self.cost.layer * 1e3:.1f} ms per layer + {self.cost.head * 1e3:.1f} ms "
                f"for the head, timed here on random weights):\n{rows}\n  {'total':<34} {_duration(self.total):>10}")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def time_plan(config: RunConfig, device: torch.device) -> TimePlan:
    """The plan of `config` on `device`, its window cost timed here (a few seconds)."""
    model_config = adapter.load_config(config.model)
    cost = measure_window_cost(model_config, config.seq_len, config.batch_size, device, run_dtype(device))
    return estimate(config, model_config, cost)


def estimate(config: RunConfig, model_config: PretrainedConfig, cost: WindowCost) -> TimePlan:
    """The run's stages and their estimated seconds (see the module's table)."""
    spec = adapter.spec_from_config(model_config, config.model)
    full = Architecture.full(spec)
    L, params, shared = spec.num_layers, full.params(), spec.shared_params()
    budget = parse_budget(config.budget, params)
    w = cost.model(L)
    w_b = cost.head + L * cost.layer * max(budget - shared, 0) / (params - shared)
    C, M = config.calibration_windows, config.search_windows
    E = max(FINAL_EVAL_WINDOWS - M, 1)  # at most: a short evaluation text gives fewer
    stages = {"importance": C * w * (3 if config.importance == "taylor" else 1)}
    needs_tables = samplers.needs_tables(config.sampler)
    if needs_tables:
        stages["tables"] = _tables_seconds(config, spec, cost)
    stages["baselines (held-out)"] = E * w + (2 + needs_tables) * E * w_b
    trial = M * w_b * objective_class(config.objective).relative_cost + PREDICTOR_S
    stages["trials"] = config.trials * trial
    stages["summary (held-out)"] = E * w_b
    if config.export:
        stages["export (re-fit, LoRA, write)"] = _export_seconds(config, cost, w, w_b, E)
    return TimePlan(stages, cost)


def _tables_seconds(config: RunConfig, spec, cost: WindowCost) -> float:
    grid = Grid.spread(spec, config.sensitivity_points)
    S, L = min(config.sensitivity_windows, config.search_windows), spec.num_layers
    started = sum((L - layer) * cost.layer + cost.head for _, layer, _ in grid.options(spec))
    dense = S * (started + cost.model(L) + L * cost.layer)
    local_windows = table_windows(config, spec) - grid.windows_evaluated(spec, S)
    if not local_windows:
        return dense
    # its options spread evenly over the layers start on average halfway down the decoder
    local = (local_windows - S) * ((L + 1) / 2 * cost.layer + cost.head) + S * (cost.model(L) + L * cost.layer)
    return dense + local


def _export_seconds(config: RunConfig, cost: WindowCost, w: float, w_b: float, E: int) -> float:
    M = config.search_windows
    seconds = 0.0 if config.objective == "perplexity" else (1 + config.reconstruct) * E * w  # the summary's again
    if config.reconstruct:  # the unfitted slice on the search windows, then each damping's re-fit
        damps = len(DAMP_CHOICES) if config.reconstruct_damp is None else 1
        K = min(ReconstructionConfig().windows, config.calibration_windows)
        seconds += M * w_b + damps * (REFIT_PASSES * K * (w - cost.head) + M * w_b)
    seconds += E * w_b  # the slice
    if config.recover_steps > 0:
        if config.distill > 0:
            seconds += TEACHER_PASSES * config.tuning_windows() * w  # the dense model's targets
        validations = len(RecoveryConfig(steps=config.recover_steps).validation_steps())
        seconds += validations * M * w_b + config.recover_steps * config.batch_size * TRAIN_PASSES * w_b
        seconds += E * w_b  # the recovered model
    return seconds
