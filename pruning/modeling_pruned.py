"""Modelling code for LLaMA-family models with a different shape in every decoder layer.

This file is copied into every exported model directory and loaded by
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`, so it
imports only torch and transformers (never this project).

The config is the base family's config (global dimensions of the *unpruned*
model, which the stock config validates) plus one extra key:

    "layer_shapes": [{"kv_heads": kv, "heads_per_group": h, "ffn_channels": f}, ...]   # one per layer

transformers 5's `per_layer_config` is not used as the carrier: LlamaConfig raises
AmbiguousGlobalPerLayerAttributeError for a per-layer num_attention_heads and the
Llama/Mistral/Qwen2 modelling code has no per-layer support, so the model classes
below build the stock model and then resize each layer, exactly as the pruning
tool sliced it:

    q_proj: (kv * h * head_dim, hidden)   k_proj, v_proj: (kv * head_dim, hidden)
    o_proj: (hidden, kv * h * head_dim)   num_key_value_groups = h
    gate_proj, up_proj: (f, hidden)       down_proj: (hidden, f)

kv == 0 drops the attention sublayer and f == 0 drops the MLP (the sublayer adds
nothing to the residual stream; its norm becomes an Identity). Everything else,
attention kernels and the dynamic KV cache included, is the stock family code.
A static cache is not supported (it sizes every layer from the global config).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SHAPE_KEYS = ("kv_heads", "heads_per_group", "ffn_channels")


class DroppedAttention(nn.Module):
    """A removed attention sublayer: returns zeros.

    It still appends zero-head (B, 0, T, head_dim) keys/values to the KV cache, so
    the cache keeps counting positions when this layer is the one asked for its length.
    """

    def __init__(self, layer_idx: int, head_dim: int):
        super().__init__()
        self.layer_idx, self.head_dim = layer_idx, head_dim

    def forward(self, hidden_states: torch.Tensor, past_key_values=None, **kwargs):
        if past_key_values is not None:
            b, t, _ = hidden_states.shape
            empty = hidden_states.new_zeros(b, 0, t, self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx)
        return torch.zeros_like(hidden_states), None


class DroppedMLP(nn.Module):
    """A removed MLP sublayer: returns zeros."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def check_layer_shapes(config) -> None:
    """Raise ValueError unless `config.layer_shapes` has one in-range shape per layer."""
    shapes = config.layer_shapes
    if shapes is None or len(shapes) != config.num_hidden_layers:
        raise ValueError(
            f"layer_shapes must list {config.num_hidden_layers} layers, got "
            f"{None if shapes is None else len(shapes)}; re-export the model"
        )
    limits = (config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads,
              config.intermediate_size)
    bounds = dict(zip(SHAPE_KEYS, limits, strict=True))
    for i, shape in enumerate(shapes):
        values = [shape.get(k) for k in SHAPE_KEYS]
        if any(not isinstance(v, int) or not 0 <= v <= lim for v, lim in zip(values, limits, strict=True)):
            raise ValueError(f"layer {i}: shape {shape} is outside the base model's limits {bounds}")
        if (values[0] == 0) != (values[1] == 0):
            raise ValueError(f"layer {i}: kv_heads and heads_per_group must both be 0 (dropped) or both positive")


def _linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=like.bias is not None,
                     device=like.weight.device, dtype=like.weight.dtype)


def _resize_layer(layer: nn.Module, idx: int, shape: dict, config) -> None:
    """Give one stock decoder layer the pruned shape (see the module docstring)."""
    kv, h, f = (shape[k] for k in SHAPE_KEYS)
    # the stock attention's rule: hub configs of Qwen2 carry no head_dim (the export writes one in)
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    if kv == 0:
        layer.self_attn = DroppedAttention(idx, head_dim)
        layer.input_layernorm = nn.Identity()
    elif (kv, h) != (config.num_key_value_heads, config.num_attention_heads // config.num_key_value_heads):
        attn = layer.self_attn
        q_out, kv_out = kv * h * head_dim, kv * head_dim
        attn.q_proj = _linear(hidden, q_out, attn.q_proj)
        attn.k_proj = _linear(hidden, kv_out, attn.k_proj)
        attn.v_proj = _linear(hidden, kv_out, attn.v_proj)
        attn.o_proj = _linear(q_out, hidden, attn.o_proj)
        attn.num_key_value_groups = h
    if f == 0:
        layer.mlp = DroppedMLP()
        layer.post_attention_layernorm = nn.Identity()
    elif f != config.intermediate_size:
        mlp = layer.mlp
        mlp.gate_proj = _linear(hidden, f, mlp.gate_proj)
        mlp.up_proj = _linear(hidden, f, mlp.up_proj)
        mlp.down_proj = _linear(f, hidden, mlp.down_proj)
        mlp.intermediate_size = f


class _PrunedMixin:
    """Builds the stock model (on the meta device under from_pretrained), then resizes every layer."""

    def _resize_layers(self) -> None:
        check_layer_shapes(self.config)
        for idx, (layer, shape) in enumerate(zip(self.model.layers, self.config.layer_shapes, strict=True)):
            _resize_layer(layer, idx, shape, self.config)
        self.post_init()


class PrunedLlamaConfig(LlamaConfig):
    model_type = "pruned_llama"
    layer_shapes: list | None = None


class PrunedMistralConfig(MistralConfig):
    model_type = "pruned_mistral"
    layer_shapes: list | None = None


class PrunedQwen2Config(Qwen2Config):
    model_type = "pruned_qwen2"
    layer_shapes: list | None = None


class PrunedLlamaForCausalLM(_PrunedMixin, LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config: PrunedLlamaConfig):
        super().__init__(config)
        self._resize_layers()


class PrunedMistralForCausalLM(_PrunedMixin, MistralForCausalLM):
    config_class = PrunedMistralConfig

    def __init__(self, config: PrunedMistralConfig):
        super().__init__(config)
        self._resize_layers()


class PrunedQwen2ForCausalLM(_PrunedMixin, Qwen2ForCausalLM):
    config_class = PrunedQwen2Config

    def __init__(self, config: PrunedQwen2Config):
        super().__init__(config)
        self._resize_layers()
