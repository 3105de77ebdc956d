"""Physically remove the units an architecture drops, leaving a genuinely smaller model.

Kept heads of a layer are laid out group by group, so a layer with `kv_heads`
groups of `heads_per_group` query heads has

    q_proj: (kv * h * head_dim, hidden)   k_proj, v_proj: (kv * head_dim, hidden)
    o_proj: (hidden, kv * h * head_dim)   num_key_value_groups = h

and the stock attention code (repeat_kv, KV cache) runs unchanged.

`sliced_view` does the same for the length of a `with` block and puts the model back: a candidate measured
on many windows costs what the smaller model costs, not the dense one (masking zeroes, it does not skip).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from pruning import adapter
from pruning.architecture import Architecture
from pruning.compensation import InputMeans, removed_contribution
from pruning.importance import Importance


def _empty_linear(in_features: int, out_features: int, bias: bool, like: nn.Linear) -> nn.Linear:
    """An uninitialised Linear on `like`'s device and dtype (its weights are copied in next: no random init)."""
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, device=like.weight.device,
                              dtype=like.weight.dtype)


def _rows(linear: nn.Linear, index: torch.Tensor) -> nn.Linear:
    """Keep output features `index`."""
    out = _empty_linear(linear.in_features, len(index), linear.bias is not None, linear)
    with torch.no_grad():
        out.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            out.bias.copy_(linear.bias[index])
    return out


def _cols(linear: nn.Linear, index: torch.Tensor, mean: torch.Tensor | None = None) -> nn.Linear:
    """Keep input features `index`; with `mean` (in_features,), the removed inputs' mean output becomes a bias."""
    out = _empty_linear(len(index), linear.out_features, linear.bias is not None or mean is not None, linear)
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
    for i, layer in enumerate(adapter.decoder_layers(model)):
        _slice_layer(layer, i, arch, importance, means)
    return model


@contextmanager
def sliced_view(model: PreTrainedModel, arch: Architecture, importance: Importance) -> Iterator[PreTrainedModel]:
    """Within the block, `model` is `arch` sliced from it; on exit it is the model it was, its weights untouched.

    Each layer `arch` prunes gets shallow copies of its attention and MLP (sharing the dense modules'
    weights) that are then sliced: the kept weights are copied once, at most the pruned model's
    decoder weights in extra memory, and the dense modules themselves are never modified.
    """
    check_architecture(model, arch)
    full = Architecture.full(arch.spec).layers
    saved: list[tuple[nn.Module, dict[str, nn.Module]]] = []
    try:
        for i, layer in enumerate(adapter.decoder_layers(model)):
            if arch.layers[i] == full[i]:
                continue
            saved.append((layer, dict(layer._modules)))
            layer.self_attn, layer.mlp = _shell(layer.self_attn), _shell(layer.mlp)
            _slice_layer(layer, i, arch, importance)
        yield model
    finally:
        for layer, modules in saved:
            layer._modules.update(modules)  # every submodule the slicing replaced, the norms of dropped ones too


def _shell(module: nn.Module) -> nn.Module:
    """A copy of `module` that shares its submodules and parameters but not the dicts holding them, so replacing a
    projection of the copy leaves the original as it was."""
    shell = copy.copy(module)
    shell._modules, shell._parameters, shell._buffers = (dict(module._modules), dict(module._parameters),
                                                         dict(module._buffers))
    return shell


def check_architecture(model: PreTrainedModel, arch: Architecture) -> None:
    """Refuse an architecture of another model (layers, heads or FFN width differ)."""
    spec = adapter.model_spec(model)
    if (spec.num_layers, spec.num_heads, spec.intermediate_size) != (
        arch.spec.num_layers, arch.spec.num_heads, arch.spec.intermediate_size
    ):
        raise ValueError(f"architecture is for {arch.spec.base_model}, not for this model ({spec.base_model})")


def _slice_layer(layer: nn.Module, i: int, arch: Architecture, importance: Importance,
                 means: InputMeans | None = None) -> None:
    """Slice decoder layer `i` in place to `arch.layers[i]` (see `slice_model`)."""
    spec, shape, parts = arch.spec, arch.layers[i], adapter.layer_parts(layer)
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
