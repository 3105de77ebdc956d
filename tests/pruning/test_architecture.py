import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from pruning.adapter import UnsupportedModelError, spec_from_config
from pruning.architecture import Architecture, ArchitectureError, LayerShape
from tests.conftest import tiny_config


def test_json_round_trip_is_exact():
    spec = spec_from_config(tiny_config("qwen2"), "tiny")
    arch = Architecture(spec, (LayerShape(1, 2, 7), LayerShape(0, 0, 40), LayerShape(2, 3, 0)))
    again = Architecture.from_json(arch.to_json())
    assert again == arch
    assert json.loads(again.to_json()) == json.loads(arch.to_json())


def test_full_architecture_params_equal_model_numel():
    config = tiny_config("llama")
    model = AutoModelForCausalLM.from_config(config)
    assert Architecture.full(spec_from_config(config, "x")).params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (LayerShape(3, 3, 40), "kv_heads=3 but tiny has only 2"),
        (LayerShape(2, 4, 40), "heads_per_group=4 but tiny has only 3"),
        (LayerShape(2, 3, 41), "ffn_channels=41 but tiny has only 40"),
    ],
)
def test_validation_names_layer_and_limit(shape, message):
    spec = spec_from_config(tiny_config(), "tiny")
    full = LayerShape(2, 3, 40)
    with pytest.raises(ArchitectureError, match=f"layer 1: {message}"):
        Architecture(spec, (full, shape, full))


def test_layer_shape_rejects_half_dropped_attention():
    with pytest.raises(ArchitectureError, match="set both to 0 to drop attention"):
        LayerShape(0, 2, 5)
    with pytest.raises(ArchitectureError, match="non-negative int"):
        LayerShape(1, 1, -3)


def test_wrong_layer_count_is_refused():
    spec = spec_from_config(tiny_config(), "tiny")
    with pytest.raises(ArchitectureError, match="give one LayerShape per decoder layer"):
        Architecture(spec, (LayerShape(1, 1, 1),))


def test_llama2_7b_params_on_meta_device():
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    spec = spec_from_config(config, "meta-llama/Llama-2-7b-hf")
    real = sum(p.numel() for p in model.parameters())
    assert real == 6_738_415_616
    assert Architecture.full(spec).params() == real
    half = Architecture(spec, (LayerShape(32, 1, 5504),) * 32)
    assert half.params() == real - 32 * 3 * 4096 * 5504


def test_unsupported_family_is_named():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="supported are LlamaForCausalLM, MistralForCausalLM"):
        spec_from_config(GPT2Config(), "gpt2")
