"""The one module that knows how supported model families name their modules and config fields.

Everything else in the project talks to decoder layers through `LayerParts`
(roles: q, k, v, o, gate, up, down, norms) and the helpers below.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from pruning import modeling_pruned
from pruning.architecture import ModelSpec
from pruning.modeling_pruned import DroppedAttention, DroppedMLP  # shared with exported models' remote code


@dataclass(frozen=True)
class Family:
    """What every part of the tool needs to know about one supported model family."""

    class_name: str  # the stock transformers class users know
    pruned_config: type[PretrainedConfig]  # per-layer export (remote code): config and model classes
    pruned_model: type[PreTrainedModel]
    gguf_arch: str  # llama.cpp architecture of a uniform GGUF export (per-layer shapes use "deci")


# model_type -> Family: the one table the adapter, the HF export and the GGUF export read
FAMILIES = {
    "llama": Family("LlamaForCausalLM", modeling_pruned.PrunedLlamaConfig, modeling_pruned.PrunedLlamaForCausalLM,
                    "llama"),
    "mistral": Family("MistralForCausalLM", modeling_pruned.PrunedMistralConfig,
                      modeling_pruned.PrunedMistralForCausalLM, "llama"),
    "qwen2": Family("Qwen2ForCausalLM", modeling_pruned.PrunedQwen2Config, modeling_pruned.PrunedQwen2ForCausalLM,
                    "llama"),
}


class UnsupportedModelError(ValueError):
    pass


def _check_family(config: PretrainedConfig, name: str) -> str:
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        supported = ", ".join(f.class_name for f in FAMILIES.values())
        raise UnsupportedModelError(
            f"{name} is a {family!r} model; supported are {supported} (and checkpoints of those families)"
        )
    return family


def spec_from_config(config: PretrainedConfig, base_model: str) -> ModelSpec:
    """Read the dimensions the cost model needs; works on any config, no weights required."""
    family = _check_family(config, base_model)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % kv_heads:
        raise UnsupportedModelError(f"{base_model}: {heads} query heads do not split into {kv_heads} KV groups")
    attention_bias = bool(getattr(config, "attention_bias", False))
    return ModelSpec(
        base_model=base_model,
        family=family,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_kv_heads=kv_heads,
        group_size=heads // kv_heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=config.intermediate_size,
        tie_embeddings=bool(config.tie_word_embeddings),
        qkv_bias=family == "qwen2" or (family == "llama" and attention_bias),
        o_bias=family == "llama" and attention_bias,
        mlp_bias=family == "llama" and bool(getattr(config, "mlp_bias", False)),
    )


@dataclass(frozen=True)
class EngineParams:
    """What an inference engine needs beyond the shapes: norm epsilon, rotary base, context length."""

    rms_norm_eps: float
    rope_theta: float
    context_length: int


def engine_params(config: PretrainedConfig) -> EngineParams:
    """Read them from a supported config; only plain rotary embeddings (rope_type "default") are supported."""
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UnsupportedModelError(f"rope_type {rope['rope_type']!r} is not supported for engine export; "
                                    "only plain rotary embeddings (rope_type 'default') are")
    return EngineParams(rms_norm_eps=float(config.rms_norm_eps), rope_theta=float(rope.get("rope_theta", 10000.0)),
                        context_length=int(config.max_position_embeddings))


def model_spec(model: PreTrainedModel) -> ModelSpec:
    return spec_from_config(model.config, str(getattr(model, "name_or_path", "") or model.config.model_type))


def load_config(name_or_path: str) -> PretrainedConfig:
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except OSError as err:
        raise UnsupportedModelError(
            f"cannot load a model config from {name_or_path!r}: give a local model directory or a hub id "
            f"reachable from this machine ({err.__class__.__name__})"
        ) from err
    _check_family(config, name_or_path)
    return config


def load_model(name_or_path: str | Path, device: torch.device, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """Load a supported causal LM, checking its family before any weight is read."""
    load_config(str(name_or_path))
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(name_or_path: str | Path):
    return AutoTokenizer.from_pretrained(name_or_path)


@dataclass(frozen=True)
class LayerParts:
    """Roles of one decoder layer's modules."""

    layer: nn.Module
    attention: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    attention_norm: nn.Module
    mlp: nn.Module
    gate: nn.Linear
    up: nn.Linear
    down: nn.Linear
    mlp_norm: nn.Module


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    return model.get_decoder().layers


def final_norm(model: PreTrainedModel) -> nn.Module:
    return model.get_decoder().norm


def layer_parts(layer: nn.Module) -> LayerParts:
    attn, mlp = layer.self_attn, layer.mlp
    return LayerParts(
        layer=layer,
        attention=attn,
        q=getattr(attn, "q_proj", None),
        k=getattr(attn, "k_proj", None),
        v=getattr(attn, "v_proj", None),
        o=getattr(attn, "o_proj", None),
        attention_norm=layer.input_layernorm,
        mlp=mlp,
        gate=getattr(mlp, "gate_proj", None),
        up=getattr(mlp, "up_proj", None),
        down=getattr(mlp, "down_proj", None),
        mlp_norm=layer.post_attention_layernorm,
    )


def replace_attention(layer: nn.Module, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, groups: int) -> None:
    """Install sliced projections; `groups` query heads now share each key/value head."""
    attn = layer.self_attn
    attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj = q, k, v, o
    attn.num_key_value_groups = groups


def replace_mlp(layer: nn.Module, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> None:
    mlp = layer.mlp
    mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down
    mlp.intermediate_size = gate.out_features


def drop_attention(layer: nn.Module, layer_idx: int, head_dim: int) -> None:
    layer.self_attn = DroppedAttention(layer_idx, head_dim)
    layer.input_layernorm = nn.Identity()


def drop_mlp(layer: nn.Module) -> None:
    layer.mlp = DroppedMLP()
    layer.post_attention_layernorm = nn.Identity()
