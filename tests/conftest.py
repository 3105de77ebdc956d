"""Tiny models of every supported family, built locally with fixed seeds."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

FAMILIES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def tiny_config(family: str = "llama", tie: bool = False, **overrides):
    kwargs = dict(
        vocab_size=97, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    kwargs.update(overrides)
    return FAMILIES[family](**kwargs)


def tiny_model(family: str = "llama", tie: bool = False, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, tie, **overrides), dtype=torch.float32)
    model.name_or_path = f"tiny-{family}"
    return model.eval()


@pytest.fixture
def windows() -> torch.Tensor:
    return torch.randint(0, 97, (6, 16), generator=torch.Generator().manual_seed(1))
