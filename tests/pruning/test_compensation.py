"""FLAP bias compensation: the sliced model computes the dense model with removed inputs held at their mean."""

import torch

from pruning import adapter
from pruning.architecture import Architecture, LayerShape
from pruning.compensation import input_means
from pruning.importance import compute_importance
from pruning.masking import unit_masks
from pruning.slicing import slice_model
from tests.conftest import tiny_model

SHAPES = (LayerShape(1, 2, 13), LayerShape(2, 1, 21), LayerShape(1, 3, 40))  # partial only: drops have no bias


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_input_means_are_the_mean_projection_inputs(windows):
    model = tiny_model("llama")
    seen = []
    down = adapter.layer_parts(adapter.decoder_layers(model)[2]).down
    handle = down.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    means = input_means(model, windows, batch_size=4)
    handle.remove()
    torch.testing.assert_close(means.down[2], torch.cat(seen).mean(0), atol=1e-6, rtol=0)
    assert [m.shape for m in means.o] == [(48,)] * 3 and [m.shape for m in means.down] == [(40,)] * 3


def test_compensated_slice_equals_mean_replacement(windows):
    model = tiny_model("llama", attention_bias=True)  # o_proj has a bias of its own to keep
    importance = compute_importance(model, windows, "fluctuation", batch_size=4)
    means = input_means(model, windows, batch_size=4)
    arch = Architecture(adapter.model_spec(model), SHAPES)
    handles = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        parts = adapter.layer_parts(layer)
        masks = unit_masks(arch, importance, i, torch.float32, torch.device("cpu"))
        for proj, mask, mean in ((parts.o, masks[0], means.o[i]), (parts.down, masks[1], means.down[i])):
            if mask is not None:  # removed inputs read their mean
                handles.append(proj.register_forward_pre_hook(
                    lambda m, args, mask=mask, mean=mean: (args[0] * mask + mean * (1 - mask),)))
    expected = logits(model, windows)
    for h in handles:
        h.remove()
    uncompensated = logits(slice_model(tiny_model("llama", attention_bias=True), arch, importance), windows)
    sliced = slice_model(model, arch, importance, means)
    torch.testing.assert_close(logits(sliced, windows), expected, atol=1e-5, rtol=0)
    assert not torch.allclose(uncompensated, expected, atol=1e-3)
    assert sliced.model.layers[0].mlp.down_proj.bias is not None
