"""FLAP's bias compensation: what a removed channel wrote on average becomes a bias of its projection.

A removed input channel c of o_proj / down_proj (a head's channel, an FFN channel)
would have added W[:, c] * x_c to the residual stream. Replacing x_c by its mean
over the calibration windows, E[x_c], turns that into a constant the sliced
projection can carry as a bias:

    y = W[:, kept] @ x[kept] + (W[:, removed] @ E[x[removed]])        (An et al., FLAP, 2024)

so only the fluctuation of the removed channels around their mean is lost, which is
what the "fluctuation" importance score measures. `input_means` gathers E[x] in one
pass; `slicing.slice_model(..., means=...)` applies it. A dropped sublayer is not
compensated: it leaves no projection to carry the bias.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from pruning import adapter
from pruning.importance import _ChannelStats, _recorder, _run_batches


@dataclass(frozen=True)
class InputMeans:
    """Per layer, the mean input of o_proj (num_heads * head_dim,) and of down_proj (intermediate_size,)."""

    o: tuple[torch.Tensor, ...]
    down: tuple[torch.Tensor, ...]


def input_means(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 8) -> InputMeans:
    """Mean of every o_proj / down_proj input channel over all positions of `windows` (N, T)."""
    device = next(model.parameters()).device
    layers = [adapter.layer_parts(layer) for layer in adapter.decoder_layers(model)]
    stats = [(_ChannelStats(p.o.in_features, device), _ChannelStats(p.down.in_features, device)) for p in layers]
    handles = [proj.register_forward_pre_hook(_recorder(s, with_grad=False))
               for p, pair in zip(layers, stats, strict=True) for proj, s in zip((p.o, p.down), pair, strict=True)]
    try:
        _run_batches(model, windows, batch_size, backward=False)
    finally:
        for h in handles:
            h.remove()
    return InputMeans(tuple((o.sum / o.count).float() for o, _ in stats),
                      tuple((down.sum / down.count).float() for _, down in stats))


def removed_contribution(linear: torch.nn.Linear, kept: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """W[:, removed] @ mean[removed]: (out_features,), what the removed inputs added on average."""
    removed = torch.ones(linear.in_features, dtype=torch.bool)
    removed[kept] = False
    weight = linear.weight.detach()
    return (weight[:, removed.to(weight.device)].double() @ mean.to(weight.device)[removed].double()).to(weight.dtype)
