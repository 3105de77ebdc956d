"""The adapter's family table read on configs shaped as the hub ships them (no `head_dim` key)."""

from __future__ import annotations

import pytest

from pruning import adapter
from tests.conftest import FAMILIES, tiny_config

# family -> (qkv bias, o bias, MLP bias) of a stock config
BIASES = {"llama": (False, False, False), "mistral": (False, False, False), "qwen2": (True, False, False)}


@pytest.mark.parametrize("family", FAMILIES)
def test_hub_shaped_config_derives_head_dim_and_biases(family):
    config = tiny_config(family)
    spec = adapter.spec_from_config(config, f"hub-{family}")
    assert spec.head_dim == 8  # hidden 48 / 6 heads
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias) == BIASES[family]
    assert adapter.head_dim(config) == 8


def test_qwen2_hub_config_has_no_head_dim():
    assert getattr(tiny_config("qwen2"), "head_dim", None) is None


def test_llama_attention_and_mlp_bias_flags_are_read():
    spec = adapter.spec_from_config(tiny_config("llama", attention_bias=True, mlp_bias=True), "biased")
    assert (spec.qkv_bias, spec.o_bias, spec.mlp_bias) == (True, True, True)


def test_explicit_head_dim_wins_over_the_derived_one():
    assert adapter.head_dim(tiny_config("llama", head_dim=16)) == 16


def test_unsupported_family_names_the_supported_classes():
    from transformers import GPT2Config

    with pytest.raises(adapter.UnsupportedModelError,
                       match="supported are LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        adapter.spec_from_config(GPT2Config(), "gpt2")
