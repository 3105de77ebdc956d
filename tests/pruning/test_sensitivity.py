"""The sensitivity database on a real (tiny) model: each entry is the measured rise of one sublayer's move."""

from dataclasses import replace

import numpy as np
import pytest

from pruning.architecture import Architecture, LayerShape
from pruning.importance import compute_importance
from pruning.masking import masked
from pruning.metrics import next_token_logprobs, window_losses
from pruning.sensitivity import Grid, SensitivityTable, measure_sensitivity
from tests.conftest import tiny_model


@pytest.fixture
def model_and_scores(windows):
    model = tiny_model()
    return model, compute_importance(model, windows, "wanda", 8)


def moved(arch: Architecture, layer: int, shape: LayerShape) -> Architecture:
    return Architecture(arch.spec, arch.layers[:layer] + (shape,) + arch.layers[layer + 1:])


def losses_of(model, arch, scores, windows, reference=None):
    with masked(model, arch, scores):
        return window_losses(model, windows, 8, reference)


def test_dense_table_holds_each_single_sublayer_rise_of_nll_and_the_kl(model_and_scores, windows):
    model, scores = model_and_scores
    spec, grid = scores.spec, Grid.spread(scores.spec, points=3)
    table = measure_sensitivity(model, scores, windows, grid, ("nll", "kl"))
    full = Architecture.full(spec)
    dense = window_losses(model, windows, 8)
    reference = next_token_logprobs(model, windows, 8)
    for i in range(spec.num_layers):
        for f, c in enumerate(grid.ffn):
            got = losses_of(model, moved(full, i, replace(full.layers[i], ffn_channels=c)), scores, windows, reference)
            # an option of layer i runs from the hidden states entering layer i: bit for bit the full forward's
            np.testing.assert_array_equal(table.ffn["nll"][i, f], got["nll"] - dense["nll"])
            np.testing.assert_array_equal(table.ffn["kl"][i, f], got["kl"])
    assert table.ffn["nll"][:, -1].max() == table.attention["nll"][:, -1].max() == 0  # the full size: not measured
    assert table.measurements() == spec.num_layers * (len(grid.attention) + len(grid.ffn) - 2)
    assert table.windows_evaluated() == (table.measurements() + 1) * len(windows)


def test_a_table_around_a_base_measures_moves_from_it_and_reads_zero_at_it(model_and_scores, windows):
    model, scores = model_and_scores
    spec, grid = scores.spec, Grid.spread(scores.spec, points=3)
    base = Architecture(spec, (LayerShape(1, 3, 16), LayerShape(2, 3, 24), LayerShape(0, 0, 40)))  # 24: off the grid
    table = measure_sensitivity(model, scores, windows, grid, base=base)
    before = losses_of(model, base, scores, windows)["nll"]
    for i, here in enumerate(base.layers):
        for a, (kv, h) in enumerate(grid.attention):
            got = losses_of(model, moved(base, i, replace(here, kv_heads=kv, heads_per_group=h)), scores, windows)
            np.testing.assert_allclose(table.attention["nll"][i, a], got["nll"] - before, atol=1e-6)
    # its own sizes read 0, lifted only where a larger size measured a rise (the curve is made monotone)
    for i, here in enumerate(base.layers):
        larger = [f for f, c in enumerate(grid.ffn) if c > here.ffn_channels]
        lift = max([0.0, *table.ffn["nll"][i, larger].mean(-1)])
        assert table.ffn_cost(i, here.ffn_channels) == pytest.approx(lift, abs=1e-12)
    assert 24 not in grid.ffn  # layer 1's FFN lies between grid points
    # only the base's own sizes go unmeasured: those off the grid (attention 1x3, FFN 16 and 24) leave none out
    assert table.measurements() == 3 * len(grid.attention) - 2 + 3 * len(grid.ffn) - 1
    assert table.windows_evaluated() == (table.measurements() + 1) * len(windows)


def test_a_table_with_reach_measures_the_nearest_sizes_and_continues_along_the_far_table(model_and_scores, windows):
    model, scores = model_and_scores
    spec, grid = scores.spec, Grid.spread(scores.spec, points=4)  # FFN grid 0, 10, 20, 30, 40
    base = Architecture(spec, (LayerShape(1, 3, 10), LayerShape(2, 3, 25), LayerShape(0, 0, 40)))
    dense = measure_sensitivity(model, scores, windows, grid)
    full = measure_sensitivity(model, scores, windows, grid, base=base)
    near = measure_sensitivity(model, scores, windows, grid, base=base, reach=1, far=dense)
    # FFN: layer 0 (10) measures 0 and 20; layer 1 (25, off the grid) 20 and 30; layer 2 (40) only 30
    measured_ffn = {0: [0, 2], 1: [2, 3], 2: [3]}
    for i, cols in measured_ffn.items():
        np.testing.assert_array_equal(near.ffn["nll"][i, cols], full.ffn["nll"][i, cols])
    # beyond reach: the farthest measured rise plus the dense table's step from there
    for i, far, edge in ((0, 4, 2), (1, 0, 2), (2, 0, 3)):
        step = dense.ffn["nll"][i, far] - dense.ffn["nll"][i, edge]
        np.testing.assert_allclose(near.ffn["nll"][i, far], full.ffn["nll"][i, edge] + step, atol=1e-12)
    assert near.ffn["nll"][2, 4].max() == near.ffn["nll"][0, 1].max() == 0  # the base's own sizes
    options = grid.options(spec, base, reach=1)
    assert sum(kind == "ffn" for kind, _, _ in options) == 5
    assert near.measurements() == len(options) < full.measurements()
    assert near.windows_evaluated() == (len(options) + 1) * len(windows)
    with pytest.raises(ValueError, match="far table"):
        measure_sensitivity(model, scores, windows, grid, base=base, reach=1)


def test_measurements_are_cached_per_base_and_resume(model_and_scores, windows, tmp_path):
    model, scores = model_and_scores
    grid = Grid.spread(scores.spec, points=3)
    base = Architecture(scores.spec, (LayerShape(1, 3, 16),) * 3)
    dense = measure_sensitivity(model, scores, windows, grid, cache_dir=tmp_path)
    local = measure_sensitivity(model, scores, windows, grid, cache_dir=tmp_path, base=base)
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 2  # one file per base
    with masked(model, Architecture(scores.spec, (LayerShape(0, 0, 0),) * 3), scores):  # a different model...
        again = measure_sensitivity(model, scores, windows, grid, cache_dir=tmp_path, base=base)
    np.testing.assert_array_equal(again.ffn["nll"], local.ffn["nll"])  # ...reads every option from the cache
    assert not np.array_equal(dense.ffn["nll"], local.ffn["nll"])


def test_a_table_of_the_wrong_shape_or_loss_is_refused(model_and_scores):
    _, scores = model_and_scores
    grid = Grid.spread(scores.spec, points=3)
    attn = {"nll": np.zeros((3, len(grid.attention), 1))}
    with pytest.raises(ValueError, match="expected"):
        SensitivityTable(scores.spec, grid, attn, {"nll": np.zeros((3, len(grid.ffn) - 1, 1))})
    with pytest.raises(ValueError, match="measure it with that loss"):
        SensitivityTable(scores.spec, grid, attn, {"nll": np.zeros((3, len(grid.ffn), 1))}, loss="kl")
