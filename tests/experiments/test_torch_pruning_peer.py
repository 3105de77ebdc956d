"""Torch-Pruning's recipe, run for real on tiny GQA and MHA models: on budget, and runnable by stock transformers."""

import pytest
import torch

from experiments.torch_pruning_peer import allowed_head_ratio, count, prune_to_params
from tests.conftest import optional_package, tiny_model

SHAPES = {"gqa": dict(num_attention_heads=8, num_key_value_heads=2),  # like the reference model
          "mha": dict(num_attention_heads=4, num_key_value_heads=4)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_prunes_to_the_budget_and_runs(shape, windows):
    optional_package("torch_pruning", 'pip install ".[bench]"')
    dense = tiny_model("llama", hidden_size=64, head_dim=8, **SHAPES[shape])
    before = count(dense)
    budget = int(0.7 * before)
    model, ratio, head_ratio = prune_to_params(dense, budget, steps=8)
    assert 0.9 * budget < count(model) <= budget
    assert count(dense) == before and 0 < ratio < 0.95  # the dense model is untouched
    cfg = model.config
    assert cfg.hidden_size == model.model.embed_tokens.embedding_dim < 64
    assert cfg.num_attention_heads % cfg.num_key_value_heads == 0
    assert cfg.num_attention_heads * cfg.head_dim == model.model.layers[0].self_attn.q_proj.out_features
    with torch.no_grad():
        assert model(input_ids=windows).logits.shape == (*windows.shape, 97)
    assert model.generate(windows[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


def test_head_ratio_keeps_whole_kv_groups():
    gqa = tiny_model("llama", num_key_value_heads=2).config  # 6 query heads in 2 groups: steps of 2/6
    assert allowed_head_ratio(gqa, 0.2) == pytest.approx(1 / 3)
    assert allowed_head_ratio(gqa, 0.9) == pytest.approx(2 / 3)  # at least one query head per KV head
    mha = tiny_model("llama", num_key_value_heads=6).config
    assert allowed_head_ratio(mha, 0.2) == pytest.approx(1 / 6)
