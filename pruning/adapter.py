"""The one module that knows how supported model families name their modules and config fields.

Everything else in the project talks to decoder layers through `LayerParts`
(roles: q, k, v, o, gate, up, down, norms) and the helpers below.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from pruning import modeling_pruned
from pruning.architecture import ModelSpec
from pruning.modeling_pruned import DroppedAttention, DroppedMLP  # shared with exported models' remote code


@dataclass(frozen=True)
class Family:
    """What every part of the tool needs to know about one supported family: the class users know, the bias
    rules, the per-layer export (remote code) classes and llama.cpp's architecture for a uniform GGUF export."""

    causal_lm: str
    qkv_bias: Callable[[PretrainedConfig], bool]
    o_bias: Callable[[PretrainedConfig], bool]
    mlp_bias: Callable[[PretrainedConfig], bool]
    pruned_config: type
    pruned_model: type
    gguf_arch: str = "llama"  # per-layer shapes use "deci"


def _never(config: PretrainedConfig) -> bool:
    return False


def _attention_bias(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "attention_bias", False))


# model_type -> its rules: the one table pruning, the HF export and the GGUF export read
FAMILIES = {
    "llama": Family("LlamaForCausalLM", _attention_bias, _attention_bias,
                    lambda c: bool(getattr(c, "mlp_bias", False)),
                    modeling_pruned.PrunedLlamaConfig, modeling_pruned.PrunedLlamaForCausalLM),
    "mistral": Family("MistralForCausalLM", _never, _never, _never,
                      modeling_pruned.PrunedMistralConfig, modeling_pruned.PrunedMistralForCausalLM),
    "qwen2": Family("Qwen2ForCausalLM", lambda c: True, _never, _never,
                    modeling_pruned.PrunedQwen2Config, modeling_pruned.PrunedQwen2ForCausalLM),
}


class UnsupportedModelError(ValueError):
    pass


def _check_family(config: PretrainedConfig, name: str) -> str:
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        supported = ", ".join(f.causal_lm for f in FAMILIES.values())
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
    rules = FAMILIES[family]
    return ModelSpec(
        base_model=base_model,
        family=family,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_kv_heads=kv_heads,
        group_size=heads // kv_heads,
        head_dim=head_dim(config),
        intermediate_size=config.intermediate_size,
        tie_embeddings=bool(config.tie_word_embeddings),
        qkv_bias=rules.qkv_bias(config),
        o_bias=rules.o_bias(config),
        mlp_bias=rules.mlp_bias(config),
    )


def head_dim(config: PretrainedConfig) -> int:
    """Channels per attention head. Hub configs of Qwen2 (and older Llama/Mistral ones) do not set `head_dim`;
    the stock attention then uses hidden_size // num_attention_heads, and so does everything here."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


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


def is_gguf(name_or_path: str | Path) -> bool:
    """A path ending in .gguf: one llama.cpp file, which transformers dequantizes (pip install 'prunesearch[gguf]')."""
    return str(name_or_path).lower().endswith(".gguf")


def _gguf_location(name_or_path: str | Path) -> tuple[str, dict]:
    """(directory, from_pretrained keywords) of a local GGUF file."""
    path = Path(name_or_path)
    return str(path.parent), {"gguf_file": path.name}


def _gguf_package():
    try:
        import accelerate  # noqa: F401  (transformers' GGUF loading needs it)
        import gguf
    except ImportError as err:
        raise UnsupportedModelError("reading a GGUF file needs the gguf and accelerate packages: "
                                    "pip install 'prunesearch[gguf]'") from err
    return gguf


def _dequantizable(gguf, qtype) -> bool:
    """Whether gguf (which transformers dequantizes with) implements `qtype`: tried on one zero block."""
    _, type_size = gguf.GGML_QUANT_SIZES[qtype]
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _check_gguf(path: Path) -> dict:
    """Refuse, before any weight is dequantized, a GGUF file that is cut short, of an architecture
    outside FAMILIES, or holding a tensor type transformers cannot dequantize. Return the config fields the
    file's tensors call for that transformers does not read (`_gguf_bias_flags`)."""
    gguf = _gguf_package()
    try:
        reader = gguf.GGUFReader(path)  # maps every tensor: a file cut short fails here
    except (ValueError, IndexError, KeyError) as err:
        raise UnsupportedModelError(f"{path} is not a complete GGUF file ({path.stat().st_size:,} bytes); it may be "
                                    "truncated (an interrupted download or copy): fetch it again") from err
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field else None
    if arch not in FAMILIES:
        raise UnsupportedModelError(
            f"{path.name} holds a {arch!r} model (GGUF general.architecture); supported are "
            f"{', '.join(FAMILIES)}: give a GGUF file of one of those, or the model's Hugging Face directory")
    types = {t.tensor_type for t in reader.tensors}
    bad = sorted(gguf.GGMLQuantizationType(q).name for q in types if not _dequantizable(gguf, q))
    if bad:
        raise UnsupportedModelError(
            f"{path.name} stores tensors as {', '.join(bad)}, which transformers cannot dequantize (the gguf package "
            "implements no dequantization for it); give a file of another type (F32, F16, BF16, Q8_0, Q4_K_M...)")
    return _gguf_bias_flags(arch, {t.name for t in reader.tensors})


def _gguf_bias_flags(arch: str, tensors: set[str]) -> dict:
    """transformers reads a `llama` GGUF into a LlamaConfig without biases and drops the file's bias tensors;
    these flags keep them. Biases on q/k/v only (a Qwen2 written as `llama`, see finetune.gguf) leave o_proj a
    zero bias (missing weights start at zero), which computes the same function."""
    if arch != "llama":
        return {}
    flags = {}
    if any(re.search(r"\.attn_(q|k|v|output)\.bias$", name) for name in tensors):
        flags["attention_bias"] = True
    if any(re.search(r"\.ffn_(gate|up|down)\.bias$", name) for name in tensors):
        flags["mlp_bias"] = True
    return flags


def _gguf_config(path: Path) -> PretrainedConfig:
    """The config transformers reads from a checked GGUF file's metadata (no weights are read); a copy of the one
    read for this version of the file (a real model's metadata, its vocabulary included, takes seconds to parse,
    and a run reads it for the plan, the tokenizer and the model)."""
    if not path.is_file():
        raise UnsupportedModelError(f"no GGUF file at {path}; give --model an existing .gguf file or a model directory")
    stat = path.stat()
    return copy.deepcopy(_read_gguf_config(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _read_gguf_config(path: str, mtime_ns: int, size: int) -> PretrainedConfig:
    flags = _check_gguf(Path(path))
    directory, gguf_file = _gguf_location(path)
    return AutoConfig.from_pretrained(directory, **gguf_file, **flags)


def load_config(name_or_path: str) -> PretrainedConfig:
    if is_gguf(name_or_path):
        config = _gguf_config(Path(name_or_path))
        _check_family(config, name_or_path)
        return config
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
    """Load a supported causal LM, checking its family before any weight is read; a GGUF file is dequantized
    to `dtype`."""
    config = load_config(str(name_or_path))
    if is_gguf(name_or_path):
        directory, gguf_file = _gguf_location(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(directory, config=config, dtype=dtype, **gguf_file)
        model.name_or_path = str(name_or_path)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(name_or_path: str | Path):
    """The model's tokenizer; a GGUF file carries its own."""
    if is_gguf(name_or_path):
        _gguf_config(Path(name_or_path))  # the file's checks
        directory, gguf_file = _gguf_location(name_or_path)
        return AutoTokenizer.from_pretrained(directory, **gguf_file)
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
