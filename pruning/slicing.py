"""Physically remove the units an architecture drops, leaving a genuinely smaller model.

Kept heads of a layer are laid out group by group, so a layer with `kv_heads`
groups of `heads_per_group` query heads has

    q_proj: (kv * h * head_dim, hidden)   k_proj, v_proj: (kv * head_dim, hidden)
    o_proj: (hidden, kv * h * head_dim)   num_key_value_groups = h

and the stock attention code (repeat_kv, KV cache) runs unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from pruning import adapter
from pruning.architecture import Architecture
from pruning.compensation import InputMeans, removed_contribution
from pruning.importance import Importance


def _rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """Keep output features `index`."""
    out = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[index])
    return out


def _cols(linear: nn.Linear, index: torch.Tensor, mean: torch.Tensor | None = None) -> nn.Linear:
    """Keep input features `index`; with `mean` (in_features,), the removed inputs' mean output becomes a bias."""
    out = nn.Linear(len(index), linear.out_features, bias=linear.bias is not None or mean is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(linear.weight[:, index])
        if out.bias is not None:
            out.bias.zero_()
            if linear.bias is not None:
                out.bias += linear.bias
            if mean is not None:
                out.bias += removed_contribution(linear, index, mean)
    return out


def _channels(units, width: int) -> torch.Tensor:
    """Expand unit indices (n,) into their channel indices (n * width,)."""
    units = torch.as_tensor(units, dtype=torch.long).reshape(-1, 1)
    return (units * width + torch.arange(width)).reshape(-1)


def slice_model(model: PreTrainedModel, arch: Architecture, importance: Importance,
                means: InputMeans | None = None) -> PreTrainedModel:
    """Slice `model` in place to `arch` (units chosen by `importance`) and return it.

    With `means` (from `compensation.input_means` on the dense model), o_proj and down_proj
    get FLAP's bias compensation for what they lose; stock configs do not describe such
    biases, so this is for evaluation and comparison, not for `finetune.hf_writer`.
    """
    spec = arch.spec
    for i, layer in enumerate(adapter.decoder_layers(model)):
        shape, parts = arch.layers[i], adapter.layer_parts(layer)
        if shape.attention_dropped:
            adapter.drop_attention(layer, i, spec.head_dim)
        elif (shape.kv_heads, shape.heads_per_group) != (spec.num_kv_heads, spec.group_size):
            heads = importance.kept_heads(i, shape)  # (kv, h) global query-head indices
            groups = heads[:, 0] // spec.group_size
            q_index = _channels(heads.ravel(), spec.head_dim)
            kv_index = _channels(groups, spec.head_dim)
            adapter.replace_attention(
                layer, _rows(parts.q, q_index), _rows(parts.k, kv_index), _rows(parts.v, kv_index),
                _cols(parts.o, q_index, None if means is None else means.o[i]), shape.heads_per_group,
            )
        if shape.mlp_dropped:
            adapter.drop_mlp(layer)
        elif shape.ffn_channels != spec.intermediate_size:
            index = torch.as_tensor(importance.kept_channels(i, shape), dtype=torch.long)
            down = _cols(parts.down, index, None if means is None else means.down[i])
            adapter.replace_mlp(layer, _rows(parts.gate, index), _rows(parts.up, index), down)
    return model
