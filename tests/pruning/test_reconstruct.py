"""Reconstruction: the least-squares rule, layer order on the pruned model's own activations, exact slicing."""

import pytest
import torch

from pruning import adapter
from pruning.architecture import Architecture, LayerShape
from pruning.importance import compute_importance
from pruning.masking import masked
from pruning.reconstruct import ReconstructionConfig, kept_inputs, reconstruct, reconstructed, refit
from pruning.slicing import slice_model
from tests.conftest import tiny_model

SHAPES = (LayerShape(1, 2, 13), LayerShape(0, 0, 24), LayerShape(2, 1, 0))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def setup(family="llama", tie=False):
    model = tiny_model(family, tie)
    calibration = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(2))
    importance = compute_importance(model, calibration, "wanda", batch_size=4)
    return model, calibration, importance, Architecture(adapter.model_spec(model), SHAPES)


def test_refit_is_the_damped_least_squares_solution():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    w = torch.randn(5, 12, generator=g, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    new = refit(w, x.T @ x, kept, damp=1e-12)
    expected = torch.linalg.lstsq(x[:, kept], x @ w.T).solution.T  # argmin ||x_S W'^T - x W^T||
    torch.testing.assert_close(new[:, kept], expected, atol=1e-8, rtol=0)
    assert torch.count_nonzero(new[:, [1, 4, 5, 6, 9, 10]]) == 0
    plain = (x[:, kept] @ w[:, kept].T - x @ w.T).square().sum()
    assert (x[:, kept] @ new[:, kept].T - x @ w.T).square().sum() < plain
    # a stronger damping pulls the fit back towards the kept weights as they were
    damped = refit(w, x.T @ x, kept, damp=1e3)
    assert (damped[:, kept] - w[:, kept]).norm() < (new[:, kept] - w[:, kept]).norm()


@pytest.mark.parametrize(("family", "tie"), [("llama", False), ("mistral", True), ("qwen2", False)])
def test_reconstructed_full_model_equals_masked_and_sliced(family, tie, windows):
    model, calibration, importance, arch = setup(family, tie)
    reconstruct(model, arch, importance, calibration)
    full = logits(model, windows)  # removed columns are zero: the full-size model is the pruned one
    with masked(model, arch, importance):
        torch.testing.assert_close(logits(model, windows), full, atol=1e-6, rtol=0)
    sliced = slice_model(model, arch, importance)
    assert sum(p.numel() for p in sliced.parameters()) == arch.params()
    torch.testing.assert_close(logits(sliced, windows), full, atol=1e-5, rtol=0)


def _naive(model, arch, importance, calibration, damp):
    """Reference: for each layer in order, a whole-model forward on the calibration windows with the earlier
    layers already re-fitted (and the dropped sublayers zeroed); covariances of o_proj, then down_proj."""
    for i, layer in enumerate(adapter.decoder_layers(model)):
        parts, shape = adapter.layer_parts(layer), arch.layers[i]
        if shape.attention_dropped:
            parts.o.weight.data.zero_()
        if shape.mlp_dropped:
            parts.down.weight.data.zero_()
        for proj, kept in zip((parts.o, parts.down), kept_inputs(arch, importance, i), strict=True):
            if kept is None:
                continue
            seen = []
            handle = proj.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0].reshape(-1,
                                                                                                       a[0].shape[-1])))
            logits(model, calibration)
            handle.remove()
            x = torch.cat(seen).double()
            proj.weight.data.copy_(refit(proj.weight.data, x.T @ x, kept, damp))
    return model


def test_layers_are_refitted_in_order_on_the_pruned_model_s_own_activations(windows):
    model, calibration, importance, arch = setup()
    reference = _naive(tiny_model("llama"), arch, importance, calibration, 0.05)
    reconstruct(model, arch, importance, calibration, ReconstructionConfig(damp=0.05, batch_size=3))
    for mine, theirs in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)


def test_reconstruction_brings_the_output_closer_to_the_dense_model(windows):
    model, calibration, importance, arch = setup()
    dense = logits(model, calibration)
    with masked(model, arch, importance):
        raw = (logits(model, calibration) - dense).square().mean()
    with reconstructed(model, arch, importance, calibration):
        refitted = (logits(model, calibration) - dense).square().mean()
    assert refitted < 0.9 * raw


def test_reconstructed_restores_every_weight_bit_for_bit_and_full_architecture_changes_nothing(windows):
    model, calibration, importance, arch = setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model, windows)
    with reconstructed(model, arch, importance, calibration):
        assert not torch.equal(logits(model, windows), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    reconstruct(model, Architecture.full(arch.spec), importance, calibration)
    assert torch.equal(logits(model, windows), before)


def test_bad_settings_say_what_to_change():
    with pytest.raises(ValueError, match="damp must be positive"):
        ReconstructionConfig(damp=0)
    with pytest.raises(ValueError, match="at least 1"):
        ReconstructionConfig(windows=0)
