"""Masked == sliced logits, analytic == real params, exact restore, generate(), for every family."""

import itertools

import numpy as np
import pytest
import torch

from pruning import adapter, masking
from pruning.architecture import Architecture, LayerShape
from pruning.importance import compute_importance
from pruning.masking import as_candidate, masked
from pruning.slicing import slice_model, sliced_view
from tests.conftest import tiny_model

CASES = list(itertools.product(["llama", "mistral", "qwen2"], [False, True]))
SHAPES = (LayerShape(1, 2, 13), LayerShape(0, 0, 40), LayerShape(2, 1, 0))


def numel(model) -> int:
    return sum(p.numel() for p in model.parameters())


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(("family", "tie"), CASES)
def test_sliced_equals_masked_and_analytic_params(family, tie, windows):
    model = tiny_model(family, tie, attention_bias=True) if family == "llama" else tiny_model(family, tie)
    importance = compute_importance(model, windows, "wanda", batch_size=4)
    arch = Architecture(adapter.model_spec(model), SHAPES)
    with masked(model, arch, importance):
        expected = logits(model, windows)
    sliced = slice_model(model, arch, importance)
    assert numel(sliced) == arch.params()
    torch.testing.assert_close(logits(sliced, windows), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_architecture_changes_nothing(family, windows):
    model = tiny_model(family)
    before = logits(model, windows)
    importance = compute_importance(model, windows)
    arch = Architecture.full(adapter.model_spec(model))
    with masked(model, arch, importance):
        assert torch.equal(logits(model, windows), before)
    slice_model(model, arch, importance)
    assert torch.equal(logits(model, windows), before)


def test_restore_after_masking_is_bit_identical(windows):
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model, windows)
    importance = compute_importance(model, windows)
    arch = Architecture(adapter.model_spec(model), SHAPES)
    with masked(model, arch, importance):
        assert not torch.equal(logits(model, windows), before)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, windows), before)


@pytest.mark.parametrize(("family", "tie"), CASES)
def test_sliced_view_equals_masked_and_puts_every_module_back(family, tie, windows):
    model = tiny_model(family, tie, attention_bias=True) if family == "llama" else tiny_model(family, tie)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = list(model.modules())
    before = logits(model, windows)
    importance = compute_importance(model, windows, "wanda", batch_size=4)
    arch = Architecture(adapter.model_spec(model), SHAPES)
    with masked(model, arch, importance):
        expected = logits(model, windows)
    with sliced_view(model, arch, importance):
        assert numel(model) == arch.params()  # the smaller model while inside
        torch.testing.assert_close(logits(model, windows), expected, atol=1e-5, rtol=0)
    assert list(model.modules()) == modules
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, windows), before)


def test_as_candidate_slices_when_the_copy_fits_and_masks_when_it_does_not(monkeypatch, windows):
    model = tiny_model("llama")
    importance = compute_importance(model, windows)
    arch = Architecture(adapter.model_spec(model), SHAPES)
    dense_o = adapter.layer_parts(adapter.decoder_layers(model)[0]).o
    copy_bytes = masking.view_bytes(arch, 4)
    assert copy_bytes == 4 * (arch.params() - arch.spec.shared_params())  # every layer of SHAPES is pruned
    for free, sliced in ((2 * copy_bytes, True), (2 * copy_bytes - 1, False)):
        monkeypatch.setattr(masking, "free_bytes", lambda device, free=free: free)
        with as_candidate(model, arch, importance):
            o = adapter.layer_parts(adapter.decoder_layers(model)[0]).o
            assert (o is not dense_o) == sliced
            assert (o.in_features < dense_o.in_features) == sliced


def test_masking_under_autograd_matches_inference(windows):
    model = tiny_model("mistral")
    importance = compute_importance(model, windows)
    arch = Architecture(adapter.model_spec(model), SHAPES)
    with masked(model, arch, importance):
        frozen = logits(model, windows)
        grad_path = model(input_ids=windows).logits
    torch.testing.assert_close(grad_path.detach(), frozen, atol=1e-6, rtol=0)


def test_generate_with_cache_after_dropping_first_attention():
    model = tiny_model("llama")
    prompt = torch.tensor([[5, 9, 2, 33]])
    importance = compute_importance(model, torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(3)))
    arch = Architecture(adapter.model_spec(model), (LayerShape(0, 0, 20), LayerShape(1, 3, 0), LayerShape(2, 2, 40)))
    slice_model(model, arch, importance)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (1, 12)
    assert torch.equal(cached, uncached)


def test_kept_units_follow_scores():
    model = tiny_model("llama")
    importance = compute_importance(model, torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(3)))
    shape = LayerShape(1, 2, 5)
    heads = importance.kept_heads(0, shape)
    scores = importance.heads[0]
    group = heads[0, 0] // 3
    assert heads.shape == (1, 2)
    assert set(heads[0] % 3) == set(np.argsort(-scores[group])[:2])
    channels = importance.kept_channels(0, shape)
    assert list(channels) == sorted(np.argsort(-importance.channels[0])[:5])
