"""Reconstruction: the least-squares rule, its dense target and layer order, exact slicing."""

import copy

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
    y = x @ w.T + torch.randn(500, 5, generator=g, dtype=torch.float64)  # a target the kept columns cannot reach
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    x_s = x[:, kept]
    new = refit(w, x_s.T @ x_s, x_s.T @ y, kept, damp=1e-12)
    torch.testing.assert_close(new[:, kept], torch.linalg.lstsq(x_s, y).solution.T, atol=1e-8, rtol=0)
    assert torch.count_nonzero(new[:, [1, 4, 5, 6, 9, 10]]) == 0
    # the ridge form: the least-squares solution of [X_S; sqrt(λ) I] W'^T = [Y; sqrt(λ) W_S^T]
    damp = 0.3
    lam = damp * (x_s.T @ x_s).diagonal().mean()
    stacked = torch.linalg.lstsq(torch.cat([x_s, lam.sqrt() * torch.eye(6, dtype=x.dtype)]),
                                 torch.cat([y, lam.sqrt() * w[:, kept].T])).solution.T
    torch.testing.assert_close(refit(w, x_s.T @ x_s, x_s.T @ y, kept, damp)[:, kept], stacked, atol=1e-8, rtol=0)
    # a stronger damping pulls the fit back towards the kept weights as they were
    damped = refit(w, x_s.T @ x_s, x_s.T @ y, kept, damp=1e3)
    assert (damped[:, kept] - w[:, kept]).norm() < (new[:, kept] - w[:, kept]).norm()


def test_self_target_is_the_closed_form_that_ignores_the_drift():
    """target="self" fits W x on the pruned stream: W'_S = W_S + W_R C_RS (C_SS + λI)^-1."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 10, generator=g, dtype=torch.float64)
    w = torch.randn(4, 10, generator=g, dtype=torch.float64)
    kept, removed = torch.tensor([1, 2, 5, 6, 9]), torch.tensor([0, 3, 4, 7, 8])
    c = x.T @ x
    c_ss = c[kept][:, kept]
    damped = c_ss + 0.01 * c_ss.diagonal().mean() * torch.eye(5, dtype=x.dtype)
    closed = w[:, kept] + w[:, removed] @ c[removed][:, kept] @ torch.linalg.inv(damped)
    new = refit(w, c_ss, x[:, kept].T @ (x @ w.T), kept, damp=0.01)
    torch.testing.assert_close(new[:, kept], closed, atol=1e-9, rtol=0)


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


def _inputs(model, modules, ids) -> list[torch.Tensor]:
    """What each of `modules` receives in a whole-model forward on `ids`, as (N*T, features) float64."""
    seen = {m: [] for m in modules}
    handles = [m.register_forward_pre_hook(lambda mod, a: seen[mod].append(a[0].reshape(-1, a[0].shape[-1])))
               for m in modules]
    logits(model, ids)
    for h in handles:
        h.remove()
    return [torch.cat(seen[m]).double() for m in modules]


def _naive(model, arch, importance, calibration, damp, target):
    """Reference: for each layer in order, whole-model forwards on the calibration windows: the model with the
    earlier layers already re-fitted (and the dropped sublayers zeroed), and an untouched dense copy; the
    sublayer's target is the dense projection's output plus the residual stream's drift (norm inputs)."""
    dense = copy.deepcopy(model)
    for i, (layer, dense_layer) in enumerate(zip(adapter.decoder_layers(model), adapter.decoder_layers(dense),
                                                 strict=True)):
        parts, dense_parts, shape = adapter.layer_parts(layer), adapter.layer_parts(dense_layer), arch.layers[i]
        if shape.attention_dropped:
            parts.o.weight.data.zero_()
        if shape.mlp_dropped:
            parts.down.weight.data.zero_()
        pairs = ((parts.attention_norm, parts.o, dense_parts.attention_norm, dense_parts.o),
                 (parts.mlp_norm, parts.down, dense_parts.mlp_norm, dense_parts.down))
        for (norm, proj, dense_norm, dense_proj), kept in zip(pairs, kept_inputs(arch, importance, i), strict=True):
            if kept is None:
                continue
            residual, x = _inputs(model, (norm, proj), calibration)
            if target == "dense":
                dense_residual, dense_x = _inputs(dense, (dense_norm, dense_proj), calibration)
                y = dense_x @ dense_proj.weight.double().T + dense_residual - residual
            else:
                y = x @ proj.weight.double().T
            x_s = x[:, kept]
            proj.weight.data.copy_(refit(proj.weight.data, x_s.T @ x_s, x_s.T @ y, kept, damp))
    return model


@pytest.mark.parametrize("target", ["dense", "self"])
def test_layers_are_refitted_in_order_against_whole_model_forwards(target):
    model, calibration, importance, arch = setup()
    reference = _naive(tiny_model("llama"), arch, importance, calibration, 0.05, target)
    reconstruct(model, arch, importance, calibration, ReconstructionConfig(damp=0.05, batch_size=3, target=target))
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
    with pytest.raises(ValueError, match="target must be one of"):
        ReconstructionConfig(target="teacher")
