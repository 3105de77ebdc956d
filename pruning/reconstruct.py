"""Re-fit the kept weights of the projections that read pruned units, so each layer's output stays close
to what its dense weights would have written.

o_proj reads the heads' channels and down_proj the FFN channels. Keeping input channels S of such a
projection y = W x and losing R, the kept columns are re-fitted by damped least squares on calibration
activations (the structured form of SlimGPT's / ZipLM's OBS update, solved for all removed columns at once):

    min_{W'_S}  sum_t ||W'_S x_S,t - W x_t||^2 + λ ||W'_S - W_S||^2
    =>  W'_S = W_S + W_R C_RS (C_SS + λ I)^-1,      C = sum_t x_t x_t^T   (in, in),  λ = damp * mean diag(C_SS)

and W_R is set to zero, so the model itself now computes what the pruned architecture computes (masking its
removed inputs, or slicing them away, changes nothing more). No parameter is added: the shapes after slicing
are the architecture's.

Layers are done in order on the pruned, already re-fitted model's own activations: the hidden states entering
each layer are cached once ((N, T, hidden) on the model's device), so layer i runs only itself, and its o_proj is
re-fitted before the covariance of its down_proj is gathered. Memory beyond the cache: one covariance at a time
(float32, in^2: 0.48 GB for a 7B down_proj's 11008 inputs) and its float64 kept block (k^2) for the solve.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from pruning import adapter
from pruning.architecture import Architecture
from pruning.data import evenly_spaced
from pruning.importance import Importance

DEFAULT_DAMP = 1e-4  # chosen on the search windows (experiments.reconstruct_study)


@dataclass(frozen=True)
class ReconstructionConfig:
    """damp: the ridge λ as a share of C_SS's mean diagonal; windows: calibration windows used (evenly spread)."""

    damp: float = DEFAULT_DAMP
    windows: int = 32
    batch_size: int = 8

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"damp must be positive (it keeps C_SS invertible), got {self.damp!r}")
        if self.windows < 1 or self.batch_size < 1:
            raise ValueError(f"windows and batch_size must be at least 1, got {self.windows}, {self.batch_size}")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needs has been seen."""


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


def refit(weight: torch.Tensor, covariance: torch.Tensor, kept: torch.Tensor, damp: float) -> torch.Tensor:
    """W with its kept columns re-fitted and the others zero: (out, in), as `weight`.

    weight (out, in); covariance (in, in) = sum x x^T of the projection's inputs; kept (k,) column indices."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[kept] = False
    kept, removed = kept.to(weight.device), removed.nonzero().squeeze(1).to(weight.device)
    c_ss = covariance[kept][:, kept].double()  # (k, k)
    c_ss.diagonal().add_(damp * c_ss.diagonal().mean().clamp_min(1e-12))
    w = weight.double()
    # W_R C_RS (C_SS + λI)^-1 as a solve against the symmetric positive definite C_SS + λI: (out, k)
    update = torch.linalg.solve(c_ss, (w[:, removed] @ covariance[removed][:, kept].double()).T).T
    out = torch.zeros_like(weight)
    out[:, kept] = (w[:, kept] + update).to(weight.dtype)
    return out


def _layer_inputs(model: PreTrainedModel, windows: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict]]:
    """Per batch, (hidden states entering layer 0 (B, T, hidden), the keyword arguments every layer gets:
    rotary embeddings, mask, positions)."""
    device = next(model.parameters()).device
    first = adapter.decoder_layers(model)[0]
    seen = []

    def catch(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return seen


def _run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _covariance(layer: nn.Module, projection: nn.Linear, batches: list[tuple[torch.Tensor, dict]]) -> torch.Tensor:
    """sum x x^T over every position of `projection`'s inputs (in, in), float32, running `layer` on each batch only
    as far as that projection."""
    cov = torch.zeros(projection.in_features, projection.in_features, device=projection.weight.device)

    def gather(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()  # (B*T, in)
        cov.addmm_(x.T, x)
        raise _Stop

    handle = projection.register_forward_pre_hook(gather)
    try:
        for hidden, kwargs in batches:
            try:
                _run_layer(layer, hidden, kwargs)
            except _Stop:
                pass
    finally:
        handle.remove()
    return cov


@torch.inference_mode()
def reconstruct(model: PreTrainedModel, arch: Architecture, importance: Importance, windows: torch.Tensor,
                config: ReconstructionConfig = ReconstructionConfig()) -> PreTrainedModel:
    """Re-fit `model` (full-size, dense weights) in place for `arch` on calibration `windows` (N, T); returns it.

    Afterwards the removed units' o_proj / down_proj columns are zero, so the model computes the pruned
    architecture with re-fitted weights; `slicing.slice_model(model, arch, importance)` then keeps those weights.
    """
    batches = _layer_inputs(model, windows[evenly_spaced(len(windows), config.windows)], config.batch_size)
    layers = adapter.decoder_layers(model)
    for i, layer in enumerate(tqdm(layers, desc="reconstruct", leave=False)):
        parts = adapter.layer_parts(layer)
        _zero_dropped(parts, arch.layers[i])
        for projection, kept in zip((parts.o, parts.down), kept_inputs(arch, importance, i), strict=True):
            if kept is not None:
                cov = _covariance(layer, projection, batches)
                projection.weight.copy_(refit(projection.weight, cov, kept, config.damp))
        batches = [(_run_layer(layer, hidden, kwargs), kwargs) for hidden, kwargs in batches]
    return model


def _zero_dropped(parts: adapter.LayerParts, shape) -> None:
    """A dropped sublayer writes nothing: zero its output projection so the full-size model computes that too."""
    if shape.attention_dropped:
        parts.o.weight.zero_()
        if parts.o.bias is not None:
            parts.o.bias.zero_()
    if shape.mlp_dropped:
        parts.down.weight.zero_()
        if parts.down.bias is not None:
            parts.down.bias.zero_()


@contextmanager
def reconstructed(model: PreTrainedModel, arch: Architecture, importance: Importance, windows: torch.Tensor,
                  config: ReconstructionConfig = ReconstructionConfig()) -> Iterator[PreTrainedModel]:
    """Within the block, `model` is `arch` re-fitted (as `reconstruct`); afterwards its weights are restored
    bit for bit. Holds a copy of every o_proj and down_proj weight (and bias) meanwhile."""
    saved = [(p, p.detach().clone()) for layer in adapter.decoder_layers(model)
             for proj in (adapter.layer_parts(layer).o, adapter.layer_parts(layer).down)
             for p in (proj.weight, proj.bias) if p is not None]
    try:
        yield reconstruct(model, arch, importance, windows, config)
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
