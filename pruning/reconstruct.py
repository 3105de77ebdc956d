"""Re-fit the kept weights of the projections that read pruned units, so each layer's output stays close
to what the dense model writes there.

o_proj reads the heads' channels and down_proj the FFN channels. Keeping input columns S of such a projection,
its kept columns are re-fitted by damped least squares on calibration activations of the pruned model (the
structured OBS update of SlimGPT / ZipLM, solved for all columns at once):

    min_{W'_S}  sum_t ||W'_S x_S,t - y_t||^2 + λ ||W'_S - W_S||^2,      λ = damp * mean diag(G)
    =>  W'_S^T = (G + λ I)^-1 (X_S^T Y + λ W_S^T),                      G = X_S^T X_S   (k, k)

x_t is the projection's input in the pruned model. The target y_t is, with `target="self"` (the default), what
the dense weights write on that same input, W x_t: then W'_S = W_S + W_R C_RS (C_SS + λI)^-1. With
`target="dense"` it is what the dense model writes there, W x̂_t on its own input x̂_t, plus how far the pruned
model's residual stream r_t entering the sublayer has drifted from the dense one r̂_t: y_t = W x̂_t + r̂_t - r_t,
so each sublayer also pays back the drift the earlier pruning left (a second, dense, stream is run alongside).
W_R is set to zero, so the model itself computes the pruned architecture; masking its removed inputs, or slicing
them away, changes nothing more, and no parameter is added.

Layers are done in order. The hidden states entering each layer are cached once ((N, T, hidden) on the model's
device); layer i then runs alone: its o_proj is re-fitted before down_proj's statistics are gathered. The dense
target adds two such caches (the dense stream, and its residual between attention and MLP, from a dense pass of
the layer run first). Memory beyond the caches: G (k, k) and X_S^T Y (k, out) in float32 for one projection at
a time, and G in float64 for the solve (for a 7B down_proj keeping 5,500 of 11,008 channels: 0.12 + 0.09 +
0.24 GB; a cache of 32 windows of 2,048 tokens in bf16: 0.54 GB).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning import adapter
from pruning.architecture import Architecture, LayerShape
from pruning.data import evenly_spaced
from pruning.importance import Importance
from pruning.layerwise import Stop, layer_inputs, run_layer

DEFAULT_DAMP = 1e-4  # chosen on the reference model's search windows (experiments.reconstruct_study)
# what an export tries, keeping the best on the search windows: SmolLM2's searched 35% slice wants more damping
# than the reference model (see search.recovery.refit_selected)
DAMP_CHOICES = (1e-4, 1e-2, 1e-1)
# "self" is the default: the drift-paying "dense" target is far better for fixed-ratio rules on the reference model
# but slightly worse for searched architectures there, and on SmolLM2 (fewer calibration tokens per kept input)
# it over-fits: 20% uniform, search windows 330 raw, 335 "self", 1,153 "dense" (experiments/results/reconstruction.md)
TARGETS = ("self", "dense")


@dataclass(frozen=True)
class ReconstructionConfig:
    """damp: the ridge λ as a share of G's mean diagonal; windows: calibration windows used (evenly spread);
    target: "self" (the dense weights' output on the pruned stream) or "dense" (the dense model's output plus the
    residual stream's drift)."""

    damp: float = DEFAULT_DAMP
    windows: int = 32
    batch_size: int = 8
    target: Literal["self", "dense"] = "self"

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"damp must be positive (it keeps the fit well posed), got {self.damp!r}")
        if self.windows < 1 or self.batch_size < 1:
            raise ValueError(f"windows and batch_size must be at least 1, got {self.windows}, {self.batch_size}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")


def kept_inputs(arch: Architecture, importance: Importance, layer: int) -> tuple[torch.Tensor | None, ...]:
    """(o_proj kept input channels, down_proj kept input channels) of one layer, each (k,) ascending;
    None where the sublayer keeps everything or is dropped (nothing to re-fit)."""
    spec, shape = arch.spec, arch.layers[layer]
    o = down = None
    if not shape.attention_dropped and (shape.kv_heads, shape.heads_per_group) != (spec.num_kv_heads,
                                                                                    spec.group_size):
        heads = torch.as_tensor(importance.kept_heads(layer, shape).ravel(), dtype=torch.long)
        o = (heads[:, None] * spec.head_dim + torch.arange(spec.head_dim)).reshape(-1)
    if not shape.mlp_dropped and shape.ffn_channels != spec.intermediate_size:
        down = torch.as_tensor(importance.kept_channels(layer, shape), dtype=torch.long)
    return o, down


def refit(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, kept: torch.Tensor,
          damp: float) -> torch.Tensor:
    """W with its kept columns re-fitted and the others zero: (out, in), as `weight`.

    weight (out, in), whose kept columns W_S anchor the damping; gram (k, k) = X_S^T X_S of the kept inputs;
    cross (k, out) = X_S^T Y against the target outputs; kept (k,) column indices."""
    kept = kept.to(weight.device)
    w_s = weight[:, kept].double()
    g = gram.double()  # a copy: the caller's statistics stay as they are
    lam = damp * g.diagonal().mean().clamp_min(1e-12)
    g.diagonal().add_(lam)
    out = torch.zeros_like(weight)
    out[:, kept] = torch.linalg.solve(g, cross.double() + lam * w_s.T).T.to(weight.dtype)
    return out


@dataclass
class _Batch:
    """One batch of calibration windows entering the current layer, in the pruned and in the dense model, and the
    keyword arguments every layer gets (rotary embeddings, mask, positions)."""

    pruned: torch.Tensor  # (B, T, hidden)
    dense: torch.Tensor  # (B, T, hidden); once the layer's dense pass ran, its output
    kwargs: dict
    dense_mid: torch.Tensor | None = None  # the dense residual stream between attention and MLP (B, T, hidden)


def _inputs_of(layer: nn.Module, modules: tuple[nn.Module, ...], hidden: torch.Tensor,
               kwargs: dict) -> list[torch.Tensor]:
    """What each of `modules` receives when `layer` runs on `hidden`, as (B*T, features) float32, in the order
    given; the layer runs only as far as the last of them."""
    seen = []

    def gather(module, args):
        seen.append(args[0].reshape(-1, args[0].shape[-1]).float())
        if len(seen) == len(modules):
            raise Stop

    handles = [m.register_forward_pre_hook(gather) for m in modules]
    try:
        run_layer(layer, hidden, kwargs)
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def _dense_pass(layer: nn.Module, norm: nn.Module, batches: list[_Batch]) -> None:
    """Run the dense layer on each batch: `dense` becomes its output, `dense_mid` the residual stream entering
    `norm` (the MLP's norm). Both are what the pruned layer's sublayers are fitted to reach."""

    def keep(module, args):
        b.dense_mid = args[0]

    handle = norm.register_forward_pre_hook(keep)
    try:
        for b in batches:
            b.dense = run_layer(layer, b.dense, b.kwargs)
    finally:
        handle.remove()


def _fit(layer: nn.Module, norm: nn.Module, projection: nn.Linear, kept: torch.Tensor, batches: list[_Batch],
         reach: Callable[[_Batch], torch.Tensor], config: ReconstructionConfig) -> None:
    """Re-fit `projection`'s kept columns in place. `norm` is the norm in front of its sublayer: its input is the
    residual stream r the sublayer adds to. `reach(batch)`: the dense residual stream after the sublayer, so the
    target is reach - r - bias (= W x̂ + r̂ - r: the dense output plus the drift)."""
    weight = projection.weight.float()  # (out, in), still the dense W
    bias = 0.0 if projection.bias is None else projection.bias.float()
    kept_dev = kept.to(weight.device)
    gram = torch.zeros(len(kept), len(kept), device=weight.device)
    cross = torch.zeros(len(kept), weight.shape[0], device=weight.device)
    for b in batches:
        residual, x = _inputs_of(layer, (norm, projection), b.pruned, b.kwargs)
        if config.target == "dense":
            target = reach(b).reshape(residual.shape).float() - residual - bias
        else:
            target = x @ weight.T
        x_s = x[:, kept_dev]
        gram.addmm_(x_s.T, x_s)
        cross.addmm_(x_s.T, target)
    projection.weight.copy_(refit(projection.weight, gram, cross, kept, config.damp))


@torch.inference_mode()
def reconstruct(model: PreTrainedModel, arch: Architecture, importance: Importance, windows: torch.Tensor,
                config: ReconstructionConfig = ReconstructionConfig()) -> PreTrainedModel:
    """Re-fit `model` (full-size, dense weights) in place for `arch` on calibration `windows` (N, T); returns it.

    Afterwards the removed units' o_proj / down_proj columns are zero, so the model computes the pruned
    architecture with re-fitted weights; `slicing.slice_model(model, arch, importance)` then keeps those weights.
    """
    batches = [_Batch(b.hidden, b.hidden, b.kwargs) for b in
               layer_inputs(model, windows[evenly_spaced(len(windows), config.windows)], config.batch_size)]
    for i, layer in enumerate(tqdm(adapter.decoder_layers(model), desc="reconstruct", leave=False)):
        parts = adapter.layer_parts(layer)
        if config.target == "dense":
            _dense_pass(layer, parts.mlp_norm, batches)  # before any of this layer's weights change
        _zero_dropped(parts, arch.layers[i])
        o, down = kept_inputs(arch, importance, i)
        if o is not None:
            _fit(layer, parts.attention_norm, parts.o, o, batches, lambda b: b.dense_mid, config)
        if down is not None:
            _fit(layer, parts.mlp_norm, parts.down, down, batches, lambda b: b.dense, config)
        for b in batches:
            b.pruned, b.dense_mid = run_layer(layer, b.pruned, b.kwargs), None
    return model


def _zero_dropped(parts: adapter.LayerParts, shape: LayerShape) -> None:
    """A dropped sublayer writes nothing: zero its output projection so the full-size model computes that too."""
    if shape.attention_dropped:
        parts.o.weight.zero_()
        if parts.o.bias is not None:
            parts.o.bias.zero_()
    if shape.mlp_dropped:
        parts.down.weight.zero_()
        if parts.down.bias is not None:
            parts.down.bias.zero_()


Saved = list[tuple[nn.Parameter, torch.Tensor]]


def output_projections(model: PreTrainedModel, device: str | torch.device = "cpu") -> Saved:
    """A copy of every o_proj and down_proj weight (and bias), on `device`: what `restore` puts back."""
    return [(p, p.detach().to(device, copy=True)) for layer in adapter.decoder_layers(model)
            for proj in (adapter.layer_parts(layer).o, adapter.layer_parts(layer).down)
            for p in (proj.weight, proj.bias) if p is not None]


@torch.no_grad()
def restore(saved: Saved) -> None:
    for p, value in saved:
        p.copy_(value)


@contextmanager
def reconstructed(model: PreTrainedModel, arch: Architecture, importance: Importance, windows: torch.Tensor,
                  config: ReconstructionConfig = ReconstructionConfig()) -> Iterator[PreTrainedModel]:
    """Within the block, `model` is `arch` re-fitted (as `reconstruct`); afterwards its weights are restored
    bit for bit. Holds a copy of every o_proj and down_proj weight (and bias) meanwhile."""
    saved = output_projections(model, next(model.parameters()).device)
    try:
        yield reconstruct(model, arch, importance, windows, config)
    finally:
        restore(saved)
