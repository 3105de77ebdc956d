"""Write a sliced (and recovered) model as a Hugging Face directory that stock transformers loads.

Two layouts:

- uniform: every layer has the same shape, nothing dropped, and the family's stock
  config accepts the pruned dimensions (LlamaConfig, for one, insists that
  hidden_size % num_attention_heads == 0). The directory is a plain
  `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM`; no remote code.
- per-layer: the config is the base config plus `layer_shapes` (one
  {kv_heads, heads_per_group, ffn_channels} per layer) under model_type
  `pruned_<family>`, and `modeling_pruned.py` (torch + transformers only) is
  copied next to it and registered through `auto_map`, so
  `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` rebuilds
  it. A distinct model_type makes loading *without* trust_remote_code fail with
  transformers' own "needs trust_remote_code" message instead of a shape error.

The export model is built on the meta device and takes the live tensors with
`load_state_dict(strict=True, assign=True)`: no weight is copied, and any shape
the exported modelling code would rebuild differently fails here, before the
directory exists. Everything is written into a temporary sibling directory that
is renamed into place at the end (`pruning.files.replacing_directory`), so an
interrupted export leaves nothing behind.
"""

from __future__ import annotations

from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from finetune import card as model_card
from finetune.card import ModelCard
from pruning.adapter import FAMILIES
from pruning.architecture import Architecture
from pruning.files import replacing_directory

# Keys of a saved config that describe the saved class, not the model.
_CLASS_KEYS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


class ExportError(ValueError):
    pass


def is_uniform(arch: Architecture) -> bool:
    """Every layer the same shape and no sublayer dropped."""
    first = arch.layers[0]
    return all(x == first for x in arch.layers) and not (first.attention_dropped or first.mlp_dropped)


def export_config(config: PretrainedConfig, arch: Architecture) -> PretrainedConfig:
    """The config of the exported model: a stock family config when `arch` allows it, else a pruned one."""
    base = {k: v for k, v in config.to_dict().items() if k not in _CLASS_KEYS}
    if is_uniform(arch):
        shape = arch.layers[0]
        dims = dict(num_attention_heads=shape.query_heads, num_key_value_heads=shape.kv_heads,
                    intermediate_size=shape.ffn_channels, head_dim=arch.spec.head_dim)
        try:
            return AutoConfig.for_model(arch.spec.family, **{**base, **dims})
        except (ValueError, StrictDataclassError):
            pass  # the stock config rejects these dimensions: fall through to the per-layer layout
    shapes = [{"kv_heads": x.kv_heads, "heads_per_group": x.heads_per_group, "ffn_channels": x.ffn_channels}
              for x in arch.layers]
    # head_dim written out: hub configs of Qwen2 do not carry it, and the exported code must not guess it
    return FAMILIES[arch.spec.family].pruned_config(**{**base, "head_dim": arch.spec.head_dim}, layer_shapes=shapes)


def _export_model(model: PreTrainedModel, arch: Architecture) -> PreTrainedModel:
    """An instance of the exported class that shares `model`'s tensors (built on meta, then assigned)."""
    config = export_config(model.config, arch)
    with torch.device("meta"):
        family = FAMILIES[arch.spec.family]
        if isinstance(config, family.pruned_config):
            family.pruned_config.register_for_auto_class()
            family.pruned_model.register_for_auto_class("AutoModelForCausalLM")
            target = family.pruned_model(config)
        else:
            target = AutoModelForCausalLM.from_config(config)
    try:
        target.load_state_dict(model.state_dict(), strict=True, assign=True)
    except RuntimeError as err:
        raise ExportError(f"the model does not have the shapes of its architecture ({err}); was it sliced to it?") \
            from err
    if config.tie_word_embeddings:
        target.tie_weights()
    target.generation_config = model.generation_config
    return target


def export_model(model: PreTrainedModel, arch: Architecture, tokenizer, out_dir: str | Path, card: ModelCard,
                 force: bool = False) -> Path:
    """Write `model` (sliced to `arch`) with its tokenizer and a model card to `out_dir`; return the path.

    Refuses an existing `out_dir` unless `force`. Writes into a temporary sibling
    directory and renames it into place, so a failure leaves no partial directory.
    """
    out = Path(out_dir)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another directory or pass force=True (--force)")
    target = _export_model(model, arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    with replacing_directory(out) as tmp:
        target.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        remote = (tmp / "modeling_pruned.py").exists()
        (tmp / "README.md").write_text(model_card.render(arch, card, remote_code=remote), encoding="utf-8")
    return out
