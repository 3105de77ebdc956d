"""A run's memory plan from the model's config alone (no weights): the peak of every stage, and whether it fits.

Symbols: P dense parameters, P_b the budget, s bytes per weight at the run's dtype
(bf16 on CUDA: 2, float32 on the CPU: 4), B --batch-size, T --seq-len, L layers,
H hidden, I FFN width, V vocabulary, n_q / n_kv heads of width d, k = 32 teacher
top-k, r --lora-rank, N --recover-windows, D training domains.

    W       = P · s                                 the dense weights
    W_b     = P_b · s                               the pruned weights
    act     = B·T·(2H + (n_q + 2 n_kv)·d + 3I)·s     one decoder layer's live tensors in a forward pass
    saved   = B·T·(4H + (n_q + 2 n_kv)·d + 4I)·s     one layer's tensors kept for backward
    lora_in = B·T·(5H + n_q·d + I)·s                 LoRA's dropout copies of one layer's adapted inputs (none at
                                                     dropout 0, the default: an upper bound)
    attn    = B·n_q·T²·4 on the CPU                  the math SDPA kernel's scores (flash kernels on CUDA: 0)
    logits  = B·T·V·s                               a plain forward's full logits
    chunk   = min(B·(T-1), 4096)·V·(s + 4)           perplexity's LM-head chunk and its float32 copy
    lchunk  = 3·min(256 MiB, B·(T-1)·V·4)            training loss's checkpointed chunk: logits, softmax, grad
    stats   = B·T·I·16                              importance's float64 copy of down_proj's input, squared
    n_lora  = r·Σ(in + out) of the dense layers' seven projections (an upper bound for the pruned ones)
    targets = D·N·(T-1)·(8k + 4)                    teacher targets, kept in host memory

    stage (device peak)              formula
    importance (wanda, fluctuation)  W + act + attn + logits + stats
    importance (taylor)              W + L·saved + attn + logits·(1 + 8/s) + stats   (float32 loss and its grad)
    candidate evaluation             W + act + attn + chunk
    teacher targets                  W + act + attn + lchunk                          (host: + targets)
    slicing                          W + one dense layer's weights
    LoRA, checkpointing off          W_b + 16·n_lora + L·(saved + lora_in) + attn + lchunk
    LoRA, checkpointing on           W_b + 16·n_lora + L·B·T·H·s + saved + lora_in + attn + lchunk
    with distillation                + B·(T-1)·(8k + 4)                                (on the CPU: + targets)

Loading reads the weights into host memory (W) before they move to CUDA. LoRA
keeps float32 weights, gradients and two Adam moments: 16 bytes per parameter.
The recovery stages are planned only when the run recovers (export and steps > 0);
the run checkpoints on CUDA only, so that is the LoRA row the verdict reads.

A trial measures `--search-windows` windows, at full width where it masks (masking zeroes, it does not
skip; `pruning.masking.as_candidate` slices instead where the copy fits twice in free memory, and the trial is then
cheaper than this bound):

    flops ≈ windows·T·(2·P_layers + 2·L·T·n_q·d + 2·H·V)
    seconds ≥ flops / rate, rate = a measured 1024³ matmul at the run's dtype on the device (a lower bound)

The samplers that start from sensitivity tables (predictor, knapsack) first measure the dense table,
(options + 1)·--sensitivity-windows windows, and with --local-table a second one around its knapsack,
at most (every grid size of every sublayer + 1)·--sensitivity-windows: the plan counts that bound.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch

from pruning import adapter
from pruning.architecture import Architecture, format_count
from pruning.masking import free_bytes
from pruning.sensitivity import Grid
from search import samplers
from search.budget import parse_budget
from search.config import ConfigError, RunConfig
from search.objectives import objective_class
from search.recovery import TEACHER_TOP_K  # the teacher costs 8k + 4 bytes per position
from search.setup import run_dtype
from search.space import SearchSpace

GIB = 2**30
PPL_CHUNK = 4096  # pruning.metrics.perplexity's token_chunk
LOSS_CHUNK_BYTES = 256 * 2**20  # finetune.losses.LOGITS_CHUNK_BYTES
HEADROOM = 0.9  # share of the device's memory a plan may use (allocator fragmentation, CUDA context)


class PlanError(ConfigError):
    """The plan does not fit the device; the message names the option that would make it fit."""


@dataclass(frozen=True)
class Stage:
    name: str
    device_bytes: int
    host_bytes: int = 0  # beyond the device's, when the device is CUDA


@dataclass(frozen=True)
class Plan:
    model: str
    device: str
    dtype: str
    capacity_bytes: int  # the device's memory (host RAM available, on the CPU)
    host_capacity_bytes: int  # host RAM available (what a CUDA run's `host_bytes` must fit)
    params: int
    budget_params: int
    space_log10: float  # log10 of the search space's combinations (before the budget)
    space_dims: int
    weight_bytes: int
    stages: tuple[Stage, ...]
    verdict_stages: tuple[str, ...]  # the stages this run goes through (the others are shown for comparison)
    trial_windows: int
    trial_tokens: int
    trial_flops: float
    trial_seconds: float | None
    table_windows: int = 0  # the sensitivity tables' windows (the local one's upper bound), before any trial
    objective: str = "perplexity"

    @property
    def objective_cost(self) -> float:
        """The objective's trial time over a perplexity trial's, as it declares it (`Objective.relative_cost`)."""
        return objective_class(self.objective).relative_cost

    def problem(self) -> Stage | None:
        """The first stage this run goes through that does not fit the device (or the host), or None."""
        device, host = HEADROOM * self.capacity_bytes, HEADROOM * self.host_capacity_bytes
        return next((s for s in self.stages if s.name in self.verdict_stages
                     and (s.device_bytes > device or s.host_bytes > host)), None)

    def to_text(self) -> str:
        rows = "\n".join(
            f"  {s.name:<34} {_gib(s.device_bytes):>10}" + (f"   host {_gib(s.host_bytes)}" if s.host_bytes else "")
            + ("" if s.name in self.verdict_stages else "   (not in this run)") for s in self.stages)
        seconds = "n/a" if self.trial_seconds is None else f">= {self.trial_seconds:.2f} s"
        bad = self.problem()
        verdict = f"fits ({_gib(HEADROOM * self.capacity_bytes)} usable)" if bad is None else \
            f"does NOT fit: {bad.name} needs {_gib(bad.device_bytes)}" + (
                f", {_gib(bad.host_bytes)} of host memory" if bad.host_bytes > HEADROOM * self.host_capacity_bytes
                else "")
        return (
            f"memory plan: {self.model} on {self.device} ({self.dtype})\n"
            f"  parameters {format_count(self.params)} -> budget {format_count(self.budget_params)} "
            f"({self.budget_params / self.params:.1%})\n"
            f"  search space: 10^{self.space_log10:.1f} combinations over {self.space_dims} choices\n"
            f"  weights: {_gib(self.weight_bytes)}; device memory {_gib(self.capacity_bytes)}"
            + (f", host memory {_gib(self.host_capacity_bytes)}\n" if self.device != "cpu" else "\n") +
            f"  trial: {self.trial_windows} windows, {format_count(self.trial_tokens)} tokens, "
            f"{self.trial_flops:.3g} FLOPs, {seconds}\n"
            + (f"  objective {self.objective}: about {self.objective_cost:g}x a perplexity trial (as measured on the "
               "reference model)\n" if self.objective_cost != 1 else "")
            + (f"  sensitivity tables: at most {self.table_windows:,} windows "
               f"(= {self.table_windows / self.trial_windows:.0f} trials)"
               + ("" if self.trial_seconds is None else
                  f", >= {self.trial_seconds * self.table_windows / self.trial_windows:.1f} s") + "\n"
               if self.table_windows else "") +
            f"  peak per stage:\n{rows}\n  verdict: {verdict}"
        )


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class _Shape:
    """The dimensions the formulas read."""

    L: int
    H: int
    I: int  # noqa: E741  (the docstring's symbol)
    V: int
    q: int  # n_q · d
    kv: int  # n_kv · d
    n_q: int
    layer_params: int

    @classmethod
    def of(cls, arch: Architecture) -> _Shape:
        s = arch.spec
        return cls(s.num_layers, s.hidden_size, s.intermediate_size, s.vocab_size, s.num_heads * s.head_dim,
                   s.num_kv_heads * s.head_dim, s.num_heads,
                   s.attention_params(s.num_kv_heads, s.group_size) + s.mlp_params(s.intermediate_size))


def stages(shape: _Shape, config: RunConfig, s: int, cuda: bool, params: int, budget: int) -> tuple[Stage, ...]:
    """Every stage's peak for batch B and length T of `config` (see the module docstring)."""
    x = shape
    B, T = config.batch_size, config.seq_len
    W, W_b = params * s, budget * s
    act = B * T * (2 * x.H + x.q + 2 * x.kv + 3 * x.I) * s
    saved = B * T * (4 * x.H + x.q + 2 * x.kv + 4 * x.I) * s
    lora_in = B * T * (5 * x.H + x.q + x.I) * s
    attn = 0 if cuda else B * x.n_q * T * T * 4
    logits = B * T * x.V * s
    chunk = min(B * (T - 1), PPL_CHUNK) * x.V * (s + 4)
    stats = B * T * x.I * 16
    n_lora = config.lora_rank * x.L * (7 * x.H + 2 * x.q + 2 * x.kv + 3 * x.I)
    domains = 1 + len(config.domains)
    targets = domains * config.tuning_windows() * (T - 1) * (8 * TEACHER_TOP_K + 4)
    teacher_batch = B * (T - 1) * (8 * TEACHER_TOP_K + 4)
    lchunk = 3 * min(LOSS_CHUNK_BYTES, B * (T - 1) * x.V * 4)
    lora_base = W_b + 16 * n_lora + attn + lchunk
    host = 0 if cuda else targets  # on the CPU the targets share the device's memory

    return (
        Stage("load", W, W if cuda else 0),
        Stage("importance (wanda, fluctuation)", W + act + attn + logits + stats),
        Stage("importance (taylor)", W + x.L * saved + attn + logits * (1 + 8 // s) + stats),
        Stage("candidate evaluation", W + act + attn + chunk),
        Stage("teacher targets", W + act + attn + lchunk + host, targets if cuda else 0),
        Stage("slicing", W + x.layer_params * s),
        Stage("LoRA, checkpointing off", lora_base + x.L * (saved + lora_in)),
        Stage("LoRA, checkpointing on", lora_base + x.L * B * T * x.H * s + saved + lora_in),
        Stage("LoRA + distillation", lora_base + teacher_batch + host
              + (x.L * B * T * x.H * s + saved + lora_in if cuda else x.L * (saved + lora_in)),
              targets if cuda else 0),
    )


def verdict_stages(config: RunConfig, cuda: bool) -> tuple[str, ...]:
    """The stages this run goes through."""
    importance = "importance (taylor)" if config.importance == "taylor" else "importance (wanda, fluctuation)"
    names = ["load", importance, "candidate evaluation"]
    if config.export:
        names.append("slicing")
    if config.export and config.recover_steps > 0:
        if config.distill > 0:
            names += ["teacher targets", "LoRA + distillation"]
        else:
            names.append("LoRA, checkpointing on" if cuda else "LoRA, checkpointing off")
    return tuple(names)


def device_capacity(device: torch.device) -> int:
    """Bytes of memory the run may use: the GPU's total, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return free_bytes(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 1024) -> float:
    """FLOP/s of an n³ matmul at `dtype` on `device` (best of three)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def make_plan(config: RunConfig, device: torch.device, capacity: int | None = None,
              rate: float | None = None, host_capacity: int | None = None) -> Plan:
    """The plan of `config` on `device`, read from the model's config only (no weights are loaded).

    `capacity`, `host_capacity` (bytes) and `rate` (FLOP/s) default to this machine's; tests pass their own.
    """
    model_config = adapter.load_config(config.model)
    spec = adapter.spec_from_config(model_config, config.model)
    full = Architecture.full(spec)
    params = full.params()
    budget = parse_budget(config.budget, params)
    space = SearchSpace(spec, budget, ffn_step=config.ffn_step, allow_drop=config.allow_drop)
    dists = space.distributions().values()
    space_log10 = sum(math.log10((d.high - d.low) // d.step + 1) for d in dists)
    cuda = device.type == "cuda"
    dtype = run_dtype(device)
    s = dtype.itemsize
    shape = _Shape.of(full)
    tokens = config.search_windows * config.seq_len
    layer_params = params - spec.shared_params()
    flops = tokens * (2 * layer_params + 2 * shape.L * config.seq_len * shape.q + 2 * shape.H * shape.V)
    if rate is None:
        rate = matmul_rate(device, dtype)
    return Plan(
        model=config.model, device=str(device), dtype=str(dtype).removeprefix("torch."),
        capacity_bytes=device_capacity(device) if capacity is None else capacity,
        host_capacity_bytes=device_capacity(torch.device("cpu")) if host_capacity is None else host_capacity,
        params=params, budget_params=budget, space_log10=space_log10, space_dims=len(dists),
        weight_bytes=params * s, stages=stages(shape, config, s, cuda, params, budget),
        verdict_stages=verdict_stages(config, cuda), trial_windows=config.search_windows, trial_tokens=tokens,
        trial_flops=float(flops), trial_seconds=flops / rate if rate > 0 else None,
        table_windows=table_windows(config, spec), objective=config.objective,
    )


def table_windows(config: RunConfig, spec) -> int:
    """Windows the run's sensitivity tables cost before its first trial (the local table's upper bound: per
    sublayer `local_reach` grid sizes each side of the knapsack's, and those of its parameter count)."""
    if not samplers.needs_tables(config.sampler):
        return 0
    grid = Grid.spread(spec, config.sensitivity_points)
    windows = min(config.sensitivity_windows, config.search_windows)
    local = 0
    if config.local_table:
        full = Architecture.full(spec).layers[0]
        for kind in ("attention", "ffn"):
            params = grid.sizes(spec, kind, full)[0]
            ties = max(Counter(params.tolist()).values())
            local += spec.num_layers * min(len(params), 2 * config.local_reach + ties)
        local = (local + 1) * windows
    return grid.windows_evaluated(spec, windows) + local


def check_fits(plan: Plan, config: RunConfig) -> None:
    """Raise PlanError naming the option that would make the plan fit, if it does not."""
    bad = plan.problem()
    if bad is None:
        return
    usable = HEADROOM * plan.capacity_bytes
    if bad.host_bytes > HEADROOM * plan.host_capacity_bytes:
        fix = ("use a machine with more RAM" if bad.name == "load" else
               "give fewer --recover-windows, or --distill 0")
        raise PlanError(f"the run does not fit: {bad.name} needs {_gib(bad.host_bytes)} of host memory, "
                        f"{_gib(HEADROOM * plan.host_capacity_bytes)} usable; {fix}")
    need = f"{bad.name} needs {_gib(bad.device_bytes)} of the {_gib(usable)} usable on {plan.device}"
    lora = bad.name.startswith("LoRA") or bad.name == "teacher targets"
    weights = plan.budget_params * plan.weight_bytes // plan.params if lora else plan.weight_bytes
    if weights > usable:
        fix = ("lower --budget, or pass --no-export and recover elsewhere" if lora else
               f"the weights alone are {_gib(weights)} in {plan.dtype}: use a device with more memory")
        raise PlanError(f"the run does not fit: {need}; {fix}")
    for batch in range(config.batch_size - 1, 0, -1):
        if _fits(plan, replace(config, batch_size=batch)):
            raise PlanError(f"the run does not fit: {need}; give --batch-size {batch} (or less)")
    seq_len = config.seq_len // 2
    while seq_len >= 8 and not _fits(plan, replace(config, batch_size=1, seq_len=seq_len)):
        seq_len //= 2
    hint = f"give --batch-size 1 and --seq-len {seq_len}" if seq_len >= 8 else "use a device with more memory"
    if lora:
        hint += (", or --distill 0" if "distillation" in bad.name else "") + ", or --no-export"
    raise PlanError(f"the run does not fit: {need}; {hint}")


def _fits(plan: Plan, config: RunConfig) -> bool:
    """Whether every stage of the run fits under other batch size / length settings."""
    other = make_plan(config, torch.device(plan.device), plan.capacity_bytes, rate=0.0,
                      host_capacity=plan.host_capacity_bytes)
    return other.problem() is None
